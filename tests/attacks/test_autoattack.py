"""AutoAttack through torchattacks: same numbers as a direct torchattacks call, never above PGD-20, and it leaves
the model, its gradients and the caller's RNG as they were; a missing torchattacks is a one-line error."""

from __future__ import annotations

import sys

import pytest
import torch

from apart_fast.attacks import evaluate
from apart_fast.attacks.autoattack import MissingExtraError, autoattack, build, evaluate_autoattack

torchattacks = pytest.importorskip("torchattacks", reason="AutoAttack needs the [eval] extra (torchattacks)")

EPS = 0.1  # the digits demo's budget, as in conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fgsm_rs_model", "apart_model"])
def test_matches_a_direct_torchattacks_call_and_stays_below_pgd20(which, request, digits_points):
    model, (x, y) = request.getfixturevalue(which), digits_points
    direct = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    with torch.no_grad():
        direct_acc = int((model(direct(x, y)).argmax(1) == y).sum()) / len(y)
    same = evaluate_autoattack(model, x, y, EPS, steps=10, seed=0, batch_size=len(y))  # torchattacks' own settings
    assert same["robust_acc"] == pytest.approx(direct_acc, abs=1e-12)
    pgd20 = evaluate(model, x, y, eps=EPS, step=EPS / 4, steps=20)["robust_acc"]
    assert 0.2 < pgd20  # a robust model: the comparison means something
    if which != "apart_model":  # the 100-iteration run is ten times the work: once is enough for CI
        return
    ours = evaluate_autoattack(model, x, y, EPS, seed=0, batch_size=64)  # the standard version: 100 iterations
    # The standard version's 100 iterations (torchattacks 3.5.1 runs 10) may only find more: never weaker than the
    # direct call, and at most 2 of the 120 points (1.7 points) stronger.
    assert direct_acc - 2 / len(y) - 1e-9 <= ours["robust_acc"] <= direct_acc + 1e-9
    assert ours["robust_acc"] <= pgd20
    assert ours["clean_acc"] == evaluate(model, x, y, steps=0)["clean_acc"]
    s = ours["settings"]
    assert (s["apgd_steps"], s["target_classes"], s["square_queries"], s["norm"]) == (100, 9, 5000, "Linf")
    assert s["library"] == f"torchattacks {torchattacks.__version__}"


def test_bounds_modes_gradients_and_rng_are_left_alone(clean_model, digits_points):
    model, (x, y) = clean_model, digits_points
    x, y = x[:16], y[:16]
    model.zero_grad(set_to_none=True)  # the fixture's last training step left its gradients
    model.train()
    model.head.eval()  # a mixed state must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    adv = autoattack(model, x, y, EPS, steps=5, square_queries=50, batch_size=7)
    assert torch.equal(torch.get_rng_state(), rng), "torchattacks reseeds the global RNG; it must be restored"
    assert all(p.grad is None for p in model.parameters()), "FAB's backward must not reach parameters"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training and not model.head.training
    model.eval()
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= EPS + 1e-7
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert int((model(adv).argmax(1) == y).sum()) < int((model(x).argmax(1) == y).sum())
    again = autoattack(model, (x * 255).round().to(torch.uint8), y, EPS, steps=5, square_queries=50, batch_size=7)
    assert again.dtype == torch.float32 and again.shape == x.shape


def test_subsets_of_the_four_attacks(clean_model):
    assert isinstance(build(clean_model, eps=EPS, n_classes=10, attacks=("square",)), torchattacks.Square)
    both = build(clean_model, eps=EPS, n_classes=10, steps=7, attacks=("apgd-ce", "square"))
    assert [type(a).__name__ for a in both.attacks] == ["APGD", "Square"] and both.attacks[0].steps == 7
    with pytest.raises(ValueError, match="fab"):
        build(clean_model, eps=EPS, n_classes=10, attacks=("fab",))
    with pytest.raises(ValueError, match="eps"):
        build(clean_model, eps=0.0, n_classes=10)


def test_missing_torchattacks_names_the_install_command(monkeypatch, clean_model, digits_points, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    x, y = digits_points
    with pytest.raises(MissingExtraError, match=r"pip install 'apart_fast\[eval\]'"):
        autoattack(clean_model, x[:2], y[:2], EPS)
    from apart_fast.cli import main
    from apart_fast.engine import checkpoint

    path = tmp_path / "model.pt"
    checkpoint.save(path, {"kind": "model", "model_config": clean_model.config, "model": clean_model.state_dict()})
    assert main(["eval", "--checkpoint", str(path), "--attack", "autoattack", "--n", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apart_fast[eval]" in err and "torchattacks" in err


def test_eval_cli_reports_every_attack_with_its_settings_and_the_sanity_checks(clean_model, tmp_path, capsys):
    import json

    from apart_fast.cli import main
    from apart_fast.engine import checkpoint

    path = tmp_path / "model.pt"
    checkpoint.save(path, {"kind": "model", "model_config": clean_model.config, "model": clean_model.state_dict()})
    base = ["eval", "--checkpoint", str(path), "--eps", "0.1", "--step", "0.025", "--n", "16", "--aa-steps", "2",
            "--square-queries", "20", "--no-progress", "--json"]
    assert main([*base, "--attack", "all"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 16 and res["test_points"].startswith("seeded random subset")
    for key in ("clean", "pgd_ce", "pgd_cw", "autoattack"):
        assert 0 <= res[f"{key}_acc"] <= 1 and res[f"{key}_se"] >= 0
    aa = res["settings"]["autoattack"]
    assert (aa["apgd_steps"], aa["square_queries"], aa["eps"], aa["model_mode"]) == (2, 20, 0.1, "eval")
    assert res["settings"]["pgd_ce"]["steps"] == 20 and res["settings"]["pgd_cw"]["loss"] == "cw"
    assert main([*base[:-1], "--attack", "autoattack"]) == 0
    table = capsys.readouterr().out
    assert "| AutoAttack |" in table and "PGD (CE)" not in table
    assert main([*base, "--sanity"]) == 0
    checks = json.loads(capsys.readouterr().out)["sanity"]["checks"]
    assert [c["name"] for c in checks] == ["large_eps", "more_steps", "more_restarts", "black_box", "fgsm",
                                           "autoattack_gap"]
