"""APART's generator schedules: ``auto`` (the default) is the script's generator in units of eps for any run,
``script`` its constants as they are, ``full`` the previous default (eps/2 and eps from the first step)."""

from __future__ import annotations

import pytest

from apart_fast.config import (
    AUTO_SPEED,
    AUTO_WEIGHT_DECAY,
    SCRIPT_EPS,
    SCRIPT_LR,
    SCRIPT_STEP_SIZE,
    SCRIPT_STEPS,
    ApartConfig,
    Config,
    ConfigError,
)


def test_auto_is_the_script_at_the_scripts_setting():
    g = ApartConfig().resolve(SCRIPT_EPS, SCRIPT_STEPS)
    assert g.a_init == g.a_in == pytest.approx(SCRIPT_STEP_SIZE) and g.a_layer == 0.0
    assert g.lr == pytest.approx(AUTO_SPEED * SCRIPT_LR)
    assert g.weight_decay == pytest.approx(AUTO_WEIGHT_DECAY)


@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 16 / 255, 0.1])
@pytest.mark.parametrize("steps", [165, 2000, SCRIPT_STEPS, 78200])
def test_auto_holds_the_scripts_constants_in_units_of_eps(eps, steps):
    """u = a / eps: the start u, lambda * eps^2 and (lr / eps^2) x steps do not depend on eps or the run's length."""
    g = ApartConfig().resolve(eps, steps)
    assert g.a_in / eps == g.a_init / eps == pytest.approx(SCRIPT_STEP_SIZE / SCRIPT_EPS)
    assert g.weight_decay * eps**2 == pytest.approx(AUTO_WEIGHT_DECAY * SCRIPT_EPS**2)
    assert g.lr / eps**2 * steps == pytest.approx(AUTO_SPEED * SCRIPT_LR / SCRIPT_EPS**2 * SCRIPT_STEPS)


def test_full_is_the_previous_default():
    g = ApartConfig(schedule="full").resolve(0.1, 165)
    assert g.lr * 165 == pytest.approx(SCRIPT_LR * SCRIPT_STEPS)
    assert (g.a_init, g.a_in, g.a_layer, g.weight_decay) == (pytest.approx(0.05), pytest.approx(0.1), 0.0, 400.0)


def test_script_is_the_scripts_generator_for_any_run():
    for steps in (100, SCRIPT_STEPS):
        g = ApartConfig(schedule="script").resolve(8 / 255, steps)
        assert (g.lr, g.a_init, g.a_in, g.a_layer, g.weight_decay) == (5e-8, 1e-4, 1e-4, 0.0, 400.0)


def test_explicit_values_win_over_the_schedule():
    g = ApartConfig(a_init=0.01, lr=1e-3, weight_decay=7.0).resolve(8 / 255, 100)
    assert (g.a_init, g.lr, g.weight_decay) == (0.01, 1e-3, 7.0)
    assert g.a_in == pytest.approx(8 / 255 * SCRIPT_STEP_SIZE / SCRIPT_EPS)


def test_bad_schedule_is_one_line():
    with pytest.raises(ConfigError, match="--apart-schedule 'fast'; choose one of auto, script, full"):
        Config(apart=ApartConfig(schedule="fast")).validate()


def test_default_grows_from_small_on_the_demo_setting():
    """The default's point: the step sizes start small and grow under their own gradient within a short run (digits,
    the demo's setting cut to 4 epochs): the input step at least doubles, and every block step leaves zero."""
    from apart_fast.engine.loop import train
    from apart_fast.experiments import demo_config

    cfg = demo_config("apart", 4, "cpu", 0)
    cfg.eval_n, cfg.final_eval_steps = 0, 0
    res = train(cfg, progress=False)
    first, last = res["apart"], res["history"][-1]
    assert first["a_in"] == pytest.approx(cfg.eps * SCRIPT_STEP_SIZE / SCRIPT_EPS)
    assert last["a_in"] >= 2 * first["a_in"] and last["a_in"] <= 2 * cfg.eps
    blocks = [v for k, v in last.items() if k.startswith("a_layer")]
    assert blocks and min(blocks) > 0.01 * cfg.eps
