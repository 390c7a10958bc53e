"""Gradient-masking checks: a model behind a non-differentiable quantiser is flagged while PGD alone calls it
robust; properly trained models (FGSM-RS, clean) pass every check."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from apart_fast.attacks import evaluate, format_checks, sanity_checks

pytest.importorskip("torchattacks", reason="the black-box and AutoAttack checks need the [eval] extra")

EPS = 0.1  # the digits demo's budget, as in conftest.py

FAST = dict(aa_steps=20, square_queries=1000, restarts=3)  # smaller than the defaults: CI runs on 2 cores


class Quantised(nn.Module):
    """``model(round(x * levels) / levels)``: exact on the digits' 17 grey levels, zero gradient everywhere."""

    def __init__(self, model: nn.Module, levels: int = 16) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * self.levels) / self.levels)


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_masked_model_is_flagged_while_pgd_reports_it_robust(clean_model, digits_points):
    x, y = digits_points
    masked = Quantised(clean_model).eval()
    clean_pgd = evaluate(clean_model, x, y, eps=EPS, step=EPS / 4, steps=20)["robust_acc"]
    masked_pgd = evaluate(masked, x, y, eps=EPS, step=EPS / 4, steps=20)["robust_acc"]
    assert masked_pgd >= 0.5 and masked_pgd > clean_pgd + 0.3, "PGD alone must be fooled by the mask"
    report = sanity_checks(masked, x, y, EPS, **FAST)
    checks = _by_name(report)
    assert not report["passed"]
    assert not checks["black_box"]["passed"] and not checks["autoattack_gap"]["passed"]
    assert checks["autoattack_gap"]["numbers"]["gap"] > 0.3
    text = format_checks(report)
    assert "FAIL  black_box" in text and "masked" in text and "SOME CHECKS FAILED" in text


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fgsm_rs_model", "apart_model", "clean_model"])
def test_properly_trained_models_pass_every_check(which, request, digits_points):
    model = request.getfixturevalue(which)
    x, y = digits_points
    report = sanity_checks(model, x, y, EPS, **FAST)
    assert report["passed"], format_checks(report)
    checks = _by_name(report)
    assert set(checks) == {"large_eps", "more_steps", "more_restarts", "black_box", "fgsm", "autoattack_gap"}
    for c in checks.values():
        assert all(isinstance(v, float) for v in c["numbers"].values())
    if which != "clean_model":  # the checks mean something: the model is robust at eps and not at 0.5
        assert checks["more_steps"]["numbers"]["PGD-20"] > 0.3
        assert checks["large_eps"]["numbers"]["PGD-50 at eps 0.5"] <= 0.05
    assert "all checks passed" in format_checks(report)


def test_bad_settings_are_one_line_errors(clean_model, digits_points):
    x, y = digits_points
    with pytest.raises(ValueError, match="large_eps"):
        sanity_checks(clean_model, x, y, 0.1, large_eps=0.05)
    with pytest.raises(ValueError, match="eps"):
        sanity_checks(clean_model, x, y, 1.5)
