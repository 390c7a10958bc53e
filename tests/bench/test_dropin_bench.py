"""benchmarks/dropin.py: its table's means and standard errors, and an interrupted command's resume (a finished
run is evaluated without training again; an unfinished one resumes from its checkpoint)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apart_fast.bench.env import REPO_ROOT
from apart_fast.engine import loop

FORMAT1_RUN = Path(__file__).parents[1] / "engine" / "format1_run"  # a real run checkpoint (tests/engine's fixture)


@pytest.fixture(scope="module")
def dropin():
    spec = importlib.util.spec_from_file_location("dropin", REPO_ROOT / "benchmarks" / "dropin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method: str, seed: int, ce: float) -> dict:
    return {"model": "vit", "method": method, "seed": seed, "subset": 2560, "epochs": 15, "clean_test_split": 0.5, "n_test_split": 10000,
            "clean": 0.5, "pgd20_ce": ce, "pgd20_cw": ce - 0.01, "n_test": 400,
            "a_layer_over_eps": [0.1, 0.3] if method == "apart" else [], "a_in_over_eps": 0.4 if method == "apart" else None}


def test_table_means_and_standard_errors(dropin):
    table = dropin.accuracy_table([_row("apart", 0, 0.20), _row("apart", 1, 0.30), _row("clean", 0, 0.0)])
    lines = table.splitlines()
    seed0 = next(line for line in lines if line.startswith("| vit (2560 x 15) | apart | 0 |"))
    assert f"0.200 ± {math.sqrt(0.2 * 0.8 / 400):.3f}" in seed0  # the test subset's binomial error
    assert "0.100..0.300 (2 sites)" in seed0 and "| 0.400 |" in seed0
    mean_line = next(line for line in lines if "mean ± s.e. (2 seeds)" in line)
    assert "| 0.250 ± 0.050 |" in mean_line  # PGD-20 CE: mean of 0.2, 0.3; stdev 0.0707 / sqrt(2)
    assert not any("| clean | mean" in line for line in lines)  # one seed: no mean row


def test_resume_evaluates_a_finished_run_and_resumes_an_unfinished_one(dropin, tmp_path, monkeypatch):
    calls = []
    history = [{"epoch": 1, "a_in": 0.01, "a_layer0": 0.002}]

    def fake_train(cfg, *, resume=False, overwrite=False, progress=True, changed=None):
        calls.append(("train", cfg.out, resume))
        return {"history": history, "test_clean_acc": 0.4, "test_n": 10000, "train_seconds": 1.0,
                "apart": {"sites": ["layer1.0"]}}

    def fake_eval(path, **kw):
        calls.append(("eval", path))
        return {"clean_acc": 0.5, "pgd_ce_acc": 0.3, "pgd_cw_acc": 0.2, "n": kw["n"]}

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(dropin, "evaluate_checkpoint", fake_eval)
    args = argparse.Namespace(out=str(tmp_path), data_dir="d", epochs=1, batch_size=8, subset=16, n_test=4)
    finished, unfinished = tmp_path / "vit_apart_s0", tmp_path / "vit_apart_s1"
    finished.mkdir()
    (finished / "results.json").write_text(json.dumps({"history": history, "test_clean_acc": 0.45, "test_n": 10000,
                                                       "train_seconds": 2.0, "apart": {"sites": ["layer1.0"]}}))
    unfinished.mkdir()
    shutil.copy(FORMAT1_RUN / "checkpoint.pt", unfinished / "checkpoint.pt")
    row = dropin.run_one(args, "vit", "apart", 0)
    assert calls == [("eval", str(finished / "model.pt"))]
    assert row["clean_test_split"] == 0.45 and row["a_in_over_eps"] == pytest.approx(0.01 / (8 / 255), abs=1e-4)
    dropin.run_one(args, "vit", "apart", 1)
    assert calls[1] == ("train", str(unfinished), True)
    dropin.run_one(args, "vit", "apart", 2)
    assert calls[3] == ("train", str(tmp_path / "vit_apart_s2"), False)


@pytest.mark.parametrize(("flags", "needle"), [(["--models", "resnet18,foo"], "--models 'resnet18,foo': unknown 'foo'"),
                                               (["--no-cost", "--cost-only"], "exclude each other")])
def test_bad_flags_are_refused_before_anything_is_written(flags, needle, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "dropin.py"), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr.splitlines()[-1], proc.stderr
    assert not out.exists()
