"""``evaluate_checkpoint`` (``apart-fast eval``): a seeded random test subset with standard errors."""

from __future__ import annotations

import math

from apart_fast.config import Config
from apart_fast.engine.loop import train
from apart_fast.experiments import evaluate_checkpoint


def test_eval_subset_is_seeded_random_with_standard_errors(tmp_path):
    train(Config(method="clean", dataset="digits", epochs=1, eval_n=0, final_eval_steps=0, device="cpu",
                 out=str(tmp_path)), progress=False)
    kw = dict(dataset="digits", eps=0.1, step=0.025, steps=2, loss="ce", device="auto")
    a = evaluate_checkpoint(str(tmp_path / "model.pt"), n=100, **kw)
    b = evaluate_checkpoint(str(tmp_path / "model.pt"), n=100, **kw)
    assert a["n"] == 100 and a["test_points"] == "seeded random subset (seed 0)" and a == b
    assert a["device"] == "cpu" or a["device"].startswith("cuda")
    p = a["pgd_ce_acc"]
    assert math.isclose(a["pgd_ce_se"], math.sqrt(p * (1 - p) / 100))
    assert evaluate_checkpoint(str(tmp_path / "model.pt"), **kw)["test_points"] == "all"
