"""Helpers shared by the engine's reliability tests: the tiny run's flags, subprocess environment,
bit-identity checks and a self-signal injector (a module, not conftest.py: test folders share that name)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from apart_fast.engine import checkpoint

ROOT = Path(__file__).resolve().parents[2]

# A tiny APART run on the synthetic data: 1024 examples less a 32-image validation slice, batch 64 ->
# 15 steps per epoch. The generator lr is large so that the step sizes and omega really move (a resume bug would show).
TINY = ["--dataset", "synthetic", "--model", "smallcnn", "--width", "4", "--batch-size", "64", "--eval-n", "32",
        "--eval-steps", "1", "--final-eval-steps", "0", "--no-progress", "--apart-lr", "1e-3",
        "--apart-a-init", "0.01", "--apart-a-in", "0.01", "--apart-a-layer", "0.01"]
STEPS_PER_EPOCH = 15


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m apart_fast`` children: this checkout, one thread, no probe."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", APART_FAST_PROBE="0")
    return env


def run_state(out: Path) -> dict:
    """checkpoint.pt of a run folder (verified by its checksum)."""
    return checkpoint.load(out / "checkpoint.pt")


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs hold bit-identical weights, BN buffers, optimizer state, step sizes and omega store."""
    sa, sb = run_state(a), run_state(b)
    assert sa["epoch"] == sb["epoch"] and sa["step_count"] == sb["step_count"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ma, mb = sa["method"], sb["method"]
    assert torch.equal(ma["store"], mb["store"])
    for x, y in zip(ma["step_sizes"], mb["step_sizes"]):
        assert torch.equal(x, y)
    for opt in ("optimizer",):
        for i, st in sa[opt]["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, sb[opt]["state"][i][k])
    for i, st in ma["gen_optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], mb["gen_optimizer"]["state"][i]["momentum_buffer"])
    assert torch.equal(sa["rng_cpu"], sb["rng_cpu"])


def signal_at(monkeypatch: pytest.MonkeyPatch, method_cls: type, step: int, sig: int = signal.SIGINT) -> None:
    """Make the process send itself ``sig`` during global step ``step`` (1-based) of ``method_cls``."""
    orig = method_cls.step
    calls = {"n": 0}

    def step_and_signal(self, batch):  # noqa: ANN001, ANN202 - a test double
        calls["n"] += 1
        out = orig(self, batch)
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(method_cls, "step", step_and_signal)
