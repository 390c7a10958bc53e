"""``apart-fast ablation``: its plan, the frozen-at-the-end generator, the report's statistics and target checks on
hand-made units, the cost variants; one tiny end-to-end run (synthetic images stand in for CIFAR-10)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from apart_fast import ablation, ablation_report
from apart_fast.bench.cost import CostOptions, measure
from apart_fast.config import ConfigError
from apart_fast.data import load_dataset


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    ablation.add_arguments(p)
    base = ["--out", "x"]
    for k, v in kw.items():
        base += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(base)


def test_plan_runs_seed_by_seed_and_frozen_end_after_its_default():
    _, eps, order = ablation.plan(args(rows="frozen_end,default,fgsm_rs,no_layer", eps="8/255,16/255", seeds="0,1",
                                       other_seeds="0"))
    assert eps == [8 / 255, 16 / 255]
    assert order[:4] == [("default", 8 / 255, 0), ("fgsm_rs", 8 / 255, 0), ("no_layer", 8 / 255, 0), ("default", 16 / 255, 0)]
    seed0 = [u for u in order if u[2] == 0]
    assert seed0[-2:] == [("frozen_end", 8 / 255, 0), ("frozen_end", 16 / 255, 0)]
    assert {u[0] for u in order if u[2] == 1} == {"default", "fgsm_rs"}  # main rows only get the extra seed


@pytest.mark.parametrize("kw, msg", [({"rows": "default,magic"}, "--rows: unknown magic"),
                                     ({"eps": "8/0"}, "--eps '8/0' is not a number"),
                                     ({"eps": "2"}, "--eps 2.0 is outside"),
                                     ({"seeds": "0,-1"}, "--seeds '0,-1' holds a negative seed"),
                                     ({"test_n": 0}, "--test-n 0 must be at least 1")])
def test_plan_refuses_bad_input_in_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ablation.plan(args(**kw))


def test_frozen_end_takes_each_blocks_last_value():
    unit = {"history": [{"a_init": 0.5, "a_in": 0.1}, {"a_init": 0.003, "a_in": 0.02, "a_layer1": 0.2, "a_layer0": 0.1}]}
    gen = ablation.frozen_end_overrides(unit)
    assert gen == {"lr": 0.0, "a_init": 0.003, "a_in": 0.02, "a_layers": "0.1,0.2"}


def unit(row, eps, seed, acc, n=1000, **kw):
    hist = [{"epoch": 1, "a_in": 0.5 * eps, "a_init": 0.2 * eps, "a_layer0": 0.1 * eps, "a_layer1": 0.05 * eps}]
    return {"row": row, "eps": eps, "seed": seed, "pgd_ce": acc + 0.01, "pgd_cw": acc, "clean": 0.5, "n": n, "aa": None,
            "train_seconds": 1.0, "generator": {"a_in": 0.01 * eps, "a_init": 0.01 * eps}, "history": hist, **kw}


def test_summary_combines_seed_spread_and_test_error():
    s = ablation_report.summarize([unit("default", 8 / 255, s, a) for s, a in enumerate((0.30, 0.32, 0.34))])
    m, se, seed_se = s[8 / 255]["default"]["worst"]
    assert m == pytest.approx(0.32) and seed_se == pytest.approx(0.02 / math.sqrt(3))
    assert se == pytest.approx(math.sqrt(seed_se**2 + 0.32 * 0.68 / 1000))
    st = s[8 / 255]["default"]["steps"]
    assert (st["a_in_start"], st["a_in"], st["blocks_min"]) == pytest.approx((0.01, 0.5, 0.05))


def test_figures_without_a_default_unit_warn_nothing(tmp_path: Path):
    import warnings

    s = ablation_report.summarize([unit("frozen_start", 16 / 255, 1, 0.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" legend warning, seen in such a study
        names = ablation_report.figures(s, tmp_path, "footer")
    assert all((tmp_path / n).stat().st_size > 0 for n in names)


def test_autoattack_is_read_beside_pgd_on_its_own_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    calls = []

    def fake_eval(path, **kw):
        calls.append(kw)
        return {"autoattack_acc": 0.19, "pgd_ce_acc": 0.25, "pgd_cw_acc": 0.22, "n": kw["n"], "settings": {"autoattack": {}}}

    monkeypatch.setattr("apart_fast.experiments.evaluate_checkpoint", fake_eval)
    study = ablation.Study(aa_n=100)
    res = ablation.autoattack_unit(tmp_path, study, 8 / 255)
    assert calls[0]["attack"] == "all" and calls[0]["n"] == 100 and calls[0]["steps"] == 20  # one set of points
    assert (res["aa"], res["aa_n"], res["pgd_on_aa"]) == (0.19, 100, 0.22)
    units = [unit("default", 8 / 255, 0, 0.30, **res), unit("default", 8 / 255, 1, 0.30)]
    md = ablation_report.markdown(ablation_report.summarize(units), vars(study) | {"data_dir": "d", "model": "m"}, None)
    assert f"0.190 ± {math.sqrt(0.19 * 0.81 / 100):.3f} (n=100); PGD-20 0.220" in md


def test_targets_are_checked_on_the_numbers():
    e = 8 / 255
    units = [unit("default", e, s, 0.30) for s in range(3)] + [unit("frozen_start", e, s, 0.05) for s in range(3)]
    units += [unit("frozen_end", e, 0, 0.29), unit("fgsm_rs", e, 0, 0.27), unit("nfgsm", e, 0, 0.31)]
    lines = "\n".join(ablation_report.targets(ablation_report.summarize(units)))
    assert "learned vs frozen at its start (lr 0): +0.250" in lines and "— MET" in lines
    assert "learned vs frozen at the default's end values: +0.010" in lines and "NOT MET" in lines
    assert "default - FGSM-RS = +0.030" in lines  # needs +0.05 at 8/255
    assert "a_in 0.01 -> 0.500 eps (50x" in lines


def test_cost_variants_time_the_ablations_beside_the_methods():
    opts = CostOptions(methods=["pgd", "apart"], model="smallcnn", width=4, batch_size=16, dataset="synthetic", synthetic_n=64,
                       warmup=0, steps=1, rounds=1, pgd_steps=2, progress=False)
    rows, _ = measure(opts, load_dataset("synthetic", synthetic_size=64), ablation.COST_VARIANTS)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"pgd", "apart", "no_layer", "no_store"}
    assert by["pgd"]["step_vs_pgd"] == 1.0 and by["no_store"]["step_vs_pgd"] > 0


def test_tiny_study_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Two rows, one seed, on synthetic data through the same code path (the dataset name is swapped in the config)."""
    real = ablation.Study.config

    def synthetic(self, *a, **k):
        cfg = real(self, *a, **k)
        cfg.dataset, cfg.data_dir, cfg.model, cfg.train_subset = "synthetic", None, "smallcnn", None
        return cfg

    monkeypatch.setattr(ablation.Study, "config", synthetic)
    monkeypatch.setattr(ablation, "evaluate_unit", lambda path, study, eps, seed, progress: {
        "clean": 0.5, "pgd_ce": 0.3, "pgd_cw": 0.2, "n": 10, "aa": None, "aa_n": None})
    out = tmp_path / "study"
    a = args(out=out, rows="default,frozen_end,fgsm_rs", eps="8/255", seeds="0", other_seeds="0", epochs=1, width=4,
             train_subset=256, test_n=10, aa_n=0, cost_rounds=0)
    a.no_progress = True
    assert ablation.run(a) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"[ablation] wrote in {out}: ablation.md, ablation.json, ablation_steps.png, ablation_bars.png")  # each once
    units = ablation.load_units(out)
    assert sorted(u["row"] for u in units) == ["default", "fgsm_rs", "frozen_end"]
    frozen = next(u for u in units if u["row"] == "frozen_end")
    default = next(u for u in units if u["row"] == "default")
    assert frozen["generator"]["lr"] == 0.0 and frozen["generator"]["a_in"] == default["history"][-1]["a_in"]
    text = (out / "ablation.md").read_text()
    assert "APART (default)" in text and "Targets" in text
    assert (out / "ablation_steps.png").stat().st_size > 0 and (out / "ablation_bars.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="already holds ablation units; pass --resume"):
        ablation.run(a)
    a.resume = True
    assert ablation.run(a) == 0
    assert json.loads((out / "eps8" / "default" / "s0" / "unit.json").read_text())["clean"] == 0.5
