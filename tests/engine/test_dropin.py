"""APART drop-in through the engine: ``--model torchvision:resnet18`` from the CLI (sites and store in the log,
load_model and --resume rebuild and re-hook it), the issue's Python snippet on an unmodified torchvision
model, and the CUDA-graph step's static-buffer path with hooked sites."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import apart_fast
from apart_fast.cli import main
from apart_fast.config import Config
from apart_fast.models import find_sites

# digits (8x8, one channel): torchvision's 7x7/2 stem and max-pool leave a 2x2 map, cheap enough for a test
TV = ["--method", "apart", "--model", "torchvision:resnet18", "--dataset", "digits", "--train-subset", "128",
      "--batch-size", "64", "--eval-n", "0", "--final-eval-steps", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APART_FAST_PROBE", "0")


def test_cli_trains_a_torchvision_model_and_load_model_rebuilds_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TV, "--epochs", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    sites = ", ".join(f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2))
    assert f"APART: 8 layer-wise perturbation sites on the input of {sites} (hooks)" in err
    assert "APART: per-example store 128 x 1 x 10 x 10 float32 = 50.0 KiB on cpu (--apart-store-dtype: float16 " in err
    res = json.loads((out / "results.json").read_text())
    assert res["apart"]["sites"] == sites.split(", ") and res["apart"]["store_bytes"] == 128 * 100 * 4
    assert json.loads((out / "config.json").read_text())["model"] == "torchvision:resnet18"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(history[-1][f"a_layer{i}"] != 0.0 for i in range(8))  # every site's step size left its start, 0
    model = apart_fast.load_model(str(out / "model.pt"))
    assert isinstance(model, torchvision.models.ResNet) and model.conv1.in_channels == 1
    assert len(find_sites(model)) == 8  # the run's sites, re-hooked (identity until a method arms them)
    payload = apart_fast.engine.checkpoint.load(out / "model.pt")
    trained = torchvision.models.resnet18(num_classes=10)
    trained.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    trained.load_state_dict(payload["model"])  # plain torchvision keys: torchvision alone can use the weights
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained.eval()(x))
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0  # rebuilt and re-hooked on resume
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_the_issue_snippet_trains_an_unmodified_torchvision_model():
    cfg = Config(method="apart", dataset="synthetic", epochs=1, device="cpu", train_subset=128, batch_size=64, eval_n=0,
                 final_eval_steps=0)  # the issue's snippet, two steps long (the first at lr 0)
    torch.manual_seed(0)
    res = apart_fast.train(cfg, model=torchvision.models.resnet18(num_classes=10))
    assert len(res["apart"]["sites"]) == 8 and res["apart"]["sites"][0] == "layer1.0.conv1"
    assert all(res["history"][-1][f"a_layer{i}"] != 0.0 for i in range(8))


def tiny_torchvision_net() -> nn.Module:
    """A user's network built from torchvision's blocks, unmodified: stem, BasicBlock, Bottleneck with a projection."""
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8, 8),
                         Bottleneck(8, 4, 2, downsample=down), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_cuda_graph_static_step_runs_hooked_sites_on_the_cpu():
    """``--cuda-graphs`` on a CPU runs the captured step's code eagerly (static buffers, device-side optimizer
    and schedules): hooked sites train there as in the plain eager step."""
    runs = {}
    for graphs in (False, True):
        cfg = Config(method="apart", dataset="synthetic", epochs=1, device="cpu", train_subset=192, batch_size=64,
                     eval_n=0, final_eval_steps=0, cuda_graphs=graphs)
        torch.manual_seed(0)
        runs[graphs] = apart_fast.engine.loop.train(cfg, model=tiny_torchvision_net(), progress=False)
    assert runs[True]["apart"]["sites"] == ["3.conv1", "4.conv1"] and runs[True]["skipped_steps"] == 0
    for i in range(2):
        got, want = runs[True]["history"][-1][f"a_layer{i}"], runs[False]["history"][-1][f"a_layer{i}"]
        assert got != 0.0 and got == pytest.approx(want, rel=1e-4)
