"""Data-parallel training on the CPU through gloo: ranks agree, two processes compute what one
process computes on the same global batch, checkpoints resume on another number of processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import TinyRes, free_port, spawn
from reliability_helpers import ROOT, subprocess_env

from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.data import DeviceLoader
from apart_fast.engine import checkpoint
from apart_fast.engine.loop import train
from apart_fast.step.distributed import ShardLoader


def tiny_config(out: Path | None, epochs: int = 1) -> Config:
    """APART on the synthetic data (1024 examples less a 32-image validation slice, global batch 64: 15 steps per epoch)."""
    return Config(method="apart", dataset="synthetic", batch_size=64, epochs=epochs, eval_n=32, eval_steps=1,
                  final_eval_steps=0, out=None if out is None else str(out),
                  apart=ApartConfig(lr=1e-3, a_init=0.01, a_in=0.01, a_layer=0.01))


def step_sizes(dump: dict) -> list[torch.Tensor]:
    return dump["method"]["step_sizes"]


def test_two_processes_agree_with_hooked_sites_and_an_int8_store(tmp_path):
    """Sites attached by name (``--apart-sites conv1``) and a compact store under data parallelism: the ranks
    keep one model, one set of step sizes and one replicated int8 store, bit for bit."""
    cfg = tiny_config(tmp_path / "run")
    cfg.apart.sites, cfg.apart.store_dtype = "conv1", "int8"
    a, b = spawn(2, cfg.to_dict(), tmp_path, user_model="hooked")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for x, y in zip(step_sizes(a), step_sizes(b)):
        assert torch.equal(x, y)
    assert a["method"]["store"].dtype == torch.int8 and torch.equal(a["method"]["store"], b["method"]["store"])
    assert float((step_sizes(a)[2] - 0.01).abs()) > 1e-5  # the hooked site's step size trained


def test_shard_loader_slices_the_global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (40,), generator=g)
    full = list(DeviceLoader(x, y, 8, pad=2, ragged="drop", seed=3))
    shards = [list(ShardLoader(x, y, 8, pad=2, ragged="drop", seed=3, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(full) == 5
    for i, b in enumerate(full):
        for field in ("x", "y", "index", "crop", "flip"):
            joined = torch.cat([getattr(shards[0][i], field), getattr(shards[1][i], field)])
            assert torch.equal(joined, getattr(b, field)), field
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        ShardLoader(x, y, 8, pad=2, ragged="drop", rank=0, world=3)


def test_two_processes_agree_and_match_one_process(tmp_path):
    """Two gloo ranks on a BatchNorm-free model against one process on the same global batch.

    Tolerance: the only differences are float rounding (the gradient averaged over two ranks' half
    batches vs one sum; convolutions of 32 vs 64 examples may block differently), which can flip
    the sign of a gradient element that is ~1e-7 relative to its neighbours; such a flip moves one
    input or omega element by a step size (0.01 here). Over 16 steps the weights stayed within 7e-6
    of each other (measured); 1e-4 leaves room for a platform's different blocking and is orders of
    magnitude below what a wrong reduction (a sum instead of a mean, a missing step-size reduction)
    would give: those differ from the reference by ~1e-1 after one step at lr 0.2.
    """
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = spawn(2, tiny_config(tmp_path / "run2").to_dict(), tmp_path / "two")
    one = spawn(1, tiny_config(tmp_path / "run1").to_dict(), tmp_path / "one")[0]
    a, b = two
    for k in a["model"]:  # the ranks agree bit for bit: same averaged gradients, same updates
        assert torch.equal(a["model"][k], b["model"][k]), k
    for x, y in zip(step_sizes(a), step_sizes(b)):
        assert torch.equal(x, y)
    assert torch.equal(a["method"]["store"], b["method"]["store"])  # the replicated store stays identical
    for k in one["model"]:
        torch.testing.assert_close(a["model"][k], one["model"][k], rtol=1e-4, atol=1e-4)
    for x, y in zip(step_sizes(a), step_sizes(one)):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)
    moved = (step_sizes(one)[0] - 0.01).abs()
    assert float(moved) > 1e-5  # the step sizes really trained (so agreement above is not vacuous)
    # omega: every example's update applied once, as in one process. The ratio a_in/a_init differs in
    # its last bits (the step sizes do), and a sign flip of a near-zero dL2/dx1 element moves that
    # element by 2*ratio; a lost or doubled update would move a whole example (768 elements) instead.
    diff = (a["method"]["store"] - one["method"]["store"]).abs()
    assert float((diff > 1e-4).float().mean()) < 1e-3
    hist = a["history"][-1]
    assert hist["train_loss"] == pytest.approx(one["history"][-1]["train_loss"], rel=1e-3)
    # rank 0 alone wrote the run, and the checkpoint resumes in one process
    assert len((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()) == 1
    cfg = tiny_config(tmp_path / "run2", epochs=2)
    res = train(cfg, resume=True, progress=False, model=TinyRes())
    assert res["epochs"] == 2
    state = checkpoint.load(tmp_path / "run2" / "checkpoint.pt")
    assert state["epoch"] == 2 and state["world"] == 1 and state["step_count"] == 30


@pytest.mark.slow
def test_torchrun_cli_then_resume_in_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m apart_fast train`` (smallcnn with BatchNorm), resumed by one process."""
    out = tmp_path / "run"
    args = ["train", "--method", "apart", "--dataset", "synthetic", "--model", "smallcnn", "--width", "4",
            "--batch-size", "64", "--eval-n", "32", "--eval-steps", "1", "--final-eval-steps", "0", "--no-progress",
            "--epochs", "1", "--out", str(out)]
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "apart_fast", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["epochs"] == 1  # rank 0 alone printed its results
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["world"] == 2 and len(state["rank_states"]) == 2 and state["step_count"] == 15  # 992 trained on
    r = subprocess.run([sys.executable, "-m", "apart_fast", "train", "--resume", str(out), "--epochs", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["world"] == 1 and state["step_count"] == 30 and state["epoch"] == 2
