"""Robustness curves: the eps grid, accuracies that fall with eps, and eval --curve's JSON and PNG."""

from __future__ import annotations

import json

import pytest
import torch

from apart_fast.attacks import plot_curves, robustness_curve
from apart_fast.attacks.curves import eps_grid
from apart_fast.models import SmallCNN


def test_eps_grid_doubles_up_to_the_largest_budget():
    assert eps_grid(0.1, 0.5) == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.4, 0.5])
    assert eps_grid(8 / 255, 0.5) == pytest.approx([k / 255 for k in (2, 4, 8, 16, 32, 64)] + [0.5])
    with pytest.raises(ValueError, match="largest"):
        eps_grid(0.6, 0.5)


def test_curve_on_a_linear_model_falls_to_zero(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(60, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct at eps 0: the curve starts at 1
    c = robustness_curve(model, x, y, 0.05, steps_values=(1, 5, 20), batch_size=25)
    assert c["clean_acc"] == 1.0 and c["n"] == 60
    assert all(a >= b - 1e-12 for a, b in zip(c["eps_acc"], c["eps_acc"][1:])), c["eps_acc"]
    assert c["eps_acc"][-1] == 0.0 and c["eps_acc"][0] > 0.5
    assert len(c["steps_acc"]) == 3 and c["steps_acc"][-1] <= c["steps_acc"][0] + 1e-12  # linear: 1 step is optimal
    plot_curves({"linear": c}, tmp_path / "c.png", title="linear", footer="device: cpu | test")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_curve_writes_json_and_png_naming_model_device_and_command(tmp_path, capsys):
    from apart_fast.cli import main
    from apart_fast.engine import checkpoint

    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=4)
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    checkpoint.save(path, {"kind": "model", "model_config": model.config, "model": model.state_dict()})
    argv = ["eval", "--checkpoint", str(path), "--curve", "--n", "24", "--eps", "0.1", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "robustness_curve.png" in out
    res = json.loads((path.parent / "robustness_curve.json").read_text())
    assert res["model"] == "smallcnn" and res["device"] == "cpu" and "CPU" in res["device_name"]
    assert res["command"].startswith("apart-fast eval --checkpoint") and "--curve" in res["command"]
    assert res["n"] == 24 and res["test_points"].startswith("seeded random subset")
    assert len(res["curve"]["eps_values"]) == len(res["curve"]["eps_acc"]) == 6
    assert (path.parent / "robustness_curve.png").read_bytes()[:4] == b"\x89PNG"
