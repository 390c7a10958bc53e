"""End to end on the bundled digits data: APART buys real robustness over clean training."""

from __future__ import annotations

import pytest

from apart_fast.cli import main
from apart_fast.data import load_dataset
from apart_fast.engine.loop import train
from apart_fast.experiments import demo_config


@pytest.mark.slow
def test_apart_robust_accuracy_clearly_above_clean_training():
    data = load_dataset("digits")
    res = {}
    for method in ("clean", "apart"):
        cfg = demo_config(method, epochs=8, device="cpu", seed=0)
        cfg.eval_n = 0
        res[method] = train(cfg, progress=False, data=data)
    clean, apart = res["clean"], res["apart"]
    assert apart["test_clean_acc"] > 0.8
    assert apart["test_robust_acc"] > clean["test_robust_acc"] + 0.2, (apart["test_robust_acc"], clean["test_robust_acc"])


def test_demo_prints_a_table(capsys):
    assert main(["demo", "--epochs", "1", "--methods", "clean,pgd,apart"]) == 0
    out = capsys.readouterr().out
    assert "| method | clean acc | PGD-20 acc | train s | cost vs PGD-10 |" in out
    for m in ("clean", "pgd", "apart"):
        assert f"| {m} |" in out
    assert "| pgd |" in out and "1.00x" in out
