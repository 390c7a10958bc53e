"""APART's generator schedule: ``auto`` (the default) scales the script's to the run, ``script`` is the script's."""

from __future__ import annotations

import pytest

from apart_fast.config import SCRIPT_LR, SCRIPT_STEPS, ApartConfig, Config, ConfigError


@pytest.mark.parametrize("steps", [165, 2000, SCRIPT_STEPS, 78200])
def test_auto_keeps_lr_times_steps_and_starts_at_eps(steps):
    g = ApartConfig().resolve(0.1, steps)
    assert g.lr * steps == pytest.approx(SCRIPT_LR * SCRIPT_STEPS)
    assert (g.a_init, g.a_in, g.a_layer) == (pytest.approx(0.05), pytest.approx(0.1), 0.0)


def test_script_is_the_scripts_generator_for_any_run():
    for steps in (100, SCRIPT_STEPS):
        g = ApartConfig(schedule="script").resolve(8 / 255, steps)
        assert (g.lr, g.a_init, g.a_in, g.a_layer, g.weight_decay) == (5e-8, 1e-4, 1e-4, 0.0, 400.0)


def test_explicit_values_win_over_the_schedule():
    g = ApartConfig(a_init=0.01, lr=1e-3).resolve(8 / 255, 100)
    assert (g.a_init, g.lr) == (0.01, 1e-3) and g.a_in == pytest.approx(8 / 255)


def test_bad_schedule_is_one_line():
    with pytest.raises(ConfigError, match="--apart-schedule 'fast'; choose one of auto, script"):
        Config(apart=ApartConfig(schedule="fast")).validate()
