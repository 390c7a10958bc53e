"""``apart-fast reproduce``: the tiny preset writes its table, JSON and figures; the paper preset refuses the CPU."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from apart_fast.cli import build_parser, main
from apart_fast.config import ApartConfig
from apart_fast.data import load_dataset
from apart_fast.reproduce import PRESETS, command_line, method_config, subset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("repro") / "tiny"
    argv = ["reproduce", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress", "--long-fgsm",
            "--long-epochs", "2"]
    assert main(argv) == 0
    return out, argv


def test_tiny_preset_writes_table_json_and_figures(tiny_run):
    out, _ = tiny_run
    table = (out / "results.md").read_text()
    for label in ("FGSM-RS", "APART", "long FGSM", "long APART", "CW PGD-20", "AutoAttack ± s.e.", "vs PGD-10",
                  "apart-fast reproduce", "on 32 test points"):
        assert label in table
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["fgsm_rs", "apart"]
    assert [r["name"] for r in res["long_rows"]] == ["long_fgsm", "long_apart"]
    assert res["device"] == "cpu" and res["command"].startswith("apart-fast reproduce --preset tiny")
    for r in res["rows"] + res["long_rows"]:
        assert 0 <= r["clean_acc"] <= 1 and 0 <= r["pgd20_acc"] <= 1 and 0 <= r["cw20_acc"] <= 1
        assert "probe_strength_ratio" in r["history"][-1]
        assert (out / r["name"] / "metrics.jsonl").exists() and (out / r["name"] / "model_best.pt").exists()
    assert res["long_rows"][0]["epochs"] == 2
    for r in res["rows"]:  # AutoAttack and the curves on the preset's 32-point subset
        assert r["aa_n"] == 32 and len(r["curve"]["eps_acc"]) == len(r["curve"]["eps_values"])
        if r["aa_acc"] is not None:  # None only without the [eval] extra
            assert 0 <= r["aa_acc"] <= r["curve"]["clean_acc"] and r["aa_se"] >= 0
            assert f"{r['aa_acc']:.3f} ± {r['aa_se']:.3f}" in table
    for name in ("robust_acc.png", "strength_ratio.png", "apart_step_sizes.png", "long_fgsm.png",
                 "robustness_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert name in res["figures"]


def test_command_line_reparses_to_the_same_run(tiny_run):
    out, argv = tiny_run
    cmd = json.loads((out / "results.json").read_text())["command"]
    again = build_parser().parse_args(shlex.split(cmd)[1:])
    assert command_line(again) == cmd
    assert again.out == str(out) and again.long_fgsm and again.long_epochs == 2


def test_resume_reuses_finished_sub_runs(tiny_run):
    out, argv = tiny_run
    stamp = (out / "apart" / "model.pt").stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert (out / "apart" / "model.pt").stat().st_mtime_ns == stamp


def test_paper_preset_refuses_the_cpu(tmp_path, capsys):
    out = tmp_path / "paper"
    assert main(["reproduce", "--preset", "paper", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a GPU" in err and "--force" in err
    assert not out.exists()


def test_unknown_method_is_refused(capsys):
    assert main(["reproduce", "--preset", "tiny", "--methods", "fgsm,nope", "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err


def test_subset_is_seeded_random_and_class_mixed():
    data = load_dataset("digits", seed=0)
    data = data.__class__(**{**data.__dict__, "train_x": data.train_x[data.train_y.argsort()],
                             "train_y": data.train_y.sort().values})  # class-sorted, like the CIFAR folders
    a, b = subset(data, 100, 50, seed=0), subset(data, 100, 50, seed=0)
    assert a.train_x.shape[0] == 100 and a.test_x.shape[0] == 50
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert len(set(a.train_y.tolist())) == 10
    assert subset(data, None, 0, seed=0).train_x.shape == data.train_x.shape


def test_presets_use_the_default_rule_and_paper_the_scripts_run():
    preset = PRESETS["cpu"]
    cfg = method_config("apart", preset, epochs=8, width=8, n_train=4000, device="cpu", seed=0, data_dir=None, out=None)
    assert cfg.apart == ApartConfig()  # the default rule (schedule auto), no special case
    assert cfg.model == "preact18" and cfg.width == 8 and cfg.eps == pytest.approx(8 / 255)
    paper = method_config("apart", PRESETS["paper"], epochs=30, width=64, n_train=50000, device="cpu", seed=0,
                          data_dir=None, out=None)
    assert paper.apart.schedule == "script" and paper.apart.legacy_model_decay
    assert paper.eval_n == 0  # the authors trained on all 50,000 images (391 steps an epoch) and scored the last model
    assert (paper.eps, paper.eval_eps, paper.shortcut, paper.keep_last_batch, paper.amp) == (0.031, 8 / 255, "raw", True, "none")
    g = paper.apart.resolve(paper.eps, 30 * 391)
    assert (g.a_init, g.a_in, g.lr, g.weight_decay) == (1e-4, 1e-4, 5e-8, 400.0)


def test_eps_override_accepts_fractions_and_round_trips():
    args = build_parser().parse_args(["reproduce", "--preset", "cpu", "--eps", "16/255", "--long-fgsm"])
    assert args.eps == pytest.approx(16 / 255)
    cmd = command_line(args)
    assert "--eps 16/255" in cmd
    assert build_parser().parse_args(shlex.split(cmd)[1:]).eps == pytest.approx(16 / 255)
