"""``reproduce`` with N-FGSM, GradAlign and --ema: the EMA columns, standard errors and the within-noise verdicts."""

from __future__ import annotations

import json

import pytest

from apart_fast.cli import main
from apart_fast.report.comparison import format_table, within_noise
from apart_fast.report.text import indistinct, standard_error


def test_standard_error_and_noise_verdicts():
    assert standard_error(0.5, 400) == pytest.approx(0.025)
    assert standard_error(None, 400) is None and standard_error(0.5, 0) is None
    # 2 SE of a difference of two accuracies near 0.25 on 500 images: 2 * sqrt(2 * 0.25 * 0.75 / 500) = 0.0548
    assert indistinct(0.25, 0.30, 500) and not indistinct(0.25, 0.31, 500)
    rows = [{"name": "fgsm_rs", "pgd20_acc": 0.25, "test_n": 500}, {"name": "nfgsm", "pgd20_acc": 0.28, "test_n": 500},
            {"name": "pgd", "pgd20_acc": 0.40, "test_n": 500}]
    assert within_noise(rows) == ["FGSM-RS vs N-FGSM (0.250 vs 0.280)"]


def test_reproduce_reports_the_average_beside_the_last_model(tmp_path):
    out = tmp_path / "r"
    assert main(["reproduce", "--preset", "tiny", "--methods", "nfgsm,gradalign", "--ema", "0.9", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["nfgsm", "gradalign"] and res["settings"]["ema"] == 0.9
    for r in res["rows"]:
        assert 0 <= r["ema_pgd20_acc"] <= 1 and 0 <= r["ema_clean_acc"] <= 1
        assert (out / r["name"] / "model_ema.pt").exists()
    table = (out / "results.md").read_text()
    assert "| N-FGSM |" in table and "| GradAlign |" in table and "EMA PGD-20" in table and " ± " in table
    assert "within 2 standard errors" in table and "EMA (decay 0.9, warm-up 10)" in table
    assert "--ema 0.9 --ema-warmup 10" in res["command"]
    plain = format_table([{**r, "ema_pgd20_acc": None, "ema_clean_acc": None} for r in res["rows"]], res)
    assert "EMA" not in plain
