"""``bench cost`` lists N-FGSM and GradAlign with their passes and their step ratios to FGSM-RS, and times --ema."""

from __future__ import annotations

from apart_fast.bench.cost import DEFAULT_METHODS, CostOptions, run_cost


def test_cost_lists_the_competitors_and_their_ratios(tmp_path):
    assert {"nfgsm", "gradalign"} <= set(DEFAULT_METHODS)
    res = run_cost(CostOptions(methods=["fgsm_rs", "nfgsm", "gradalign"], model="smallcnn", width=4, synthetic_n=64,
                               batch_size=16, warmup=0, steps=2, rounds=2, out=str(tmp_path), progress=False, ema=0.9))
    by = {r["method"]: r for r in res["rows"]}
    assert [by[m]["passes_per_step"] for m in ("fgsm_rs", "nfgsm", "gradalign")] == [2, 2, 5]
    assert [by[m]["label"] for m in ("fgsm_rs", "nfgsm", "gradalign")] == ["FGSM-RS", "N-FGSM", "GradAlign"]
    c = res["claims"]
    assert c["nfgsm_step_vs_fgsm_rs"] == by["nfgsm"]["s_per_step"] / by["fgsm_rs"]["s_per_step"]
    assert c["gradalign_step_vs_fgsm_rs_paired"] is not None and c["apart_step_vs_pgd"] is None
    md = (tmp_path / "cost.md").read_text()
    assert "| N-FGSM | 2 |" in md and "| GradAlign | 5 |" in md and "N-FGSM step / FGSM-RS step" in md
    assert "EMA 0.9 updated after every step" in md and res["config"]["ema"] == 0.9
