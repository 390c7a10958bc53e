"""The generator's ablation switches: no per-example store (a fresh U(-1, 1) start each step) and per-block starts."""

from __future__ import annotations

import pytest
import torch

from apart_fast.config import ApartConfig, Config, ConfigError


def test_without_store_every_step_draws_a_fresh_uniform_start(images, make):
    x, y = images
    method, loader = make("apart", x, y, apart=ApartConfig(a_init=0.02, a_in=0.01, a_layer=0.01, lr=1e-3, store=False))
    assert method.store is None
    batch = next(iter(loader))
    omega1, d1, _, _ = method._pass1(batch)
    omega2, d2, _, _ = method._pass1(batch)
    assert not torch.equal(omega1, omega2)  # fresh noise, not a stored value
    for om in (omega1, omega2):
        assert om.shape == batch.x.shape and om.min() >= -1 and om.max() <= 1 and om.abs().mean() > 0.3
    torch.testing.assert_close(d1, torch.clamp(0.02 * omega1, -8 / 255, 8 / 255))
    m = method.step(batch)
    assert torch.isfinite(m["loss"])
    state = method.state_dict()
    assert state["store"] is None
    method.load_state_dict(state)


def test_store_default_keeps_the_omega_update(images, make):
    x, y = images
    method, loader = make("apart", x, y)
    before = method.store.clone()
    method.step(next(iter(loader)))
    assert not torch.equal(before, method.store)


def test_per_block_starts(images, make):
    x, y = images
    method, _ = make("apart", x, y, apart=ApartConfig(a_init=0.01, a_in=0.01, lr=0.0, a_layers="0.01,0.02"))
    assert method.a_layer.tolist() == pytest.approx([0.01, 0.02])


def test_per_block_starts_of_the_wrong_count_are_one_line(images, make):
    x, y = images
    with pytest.raises(ConfigError, match="--apart-a-layers gives 3 values but the model has 2 perturbed blocks; pass 2"):
        make("apart", x, y, apart=ApartConfig(a_layers="0.01,0.02,0.03"))


@pytest.mark.parametrize("text, msg", [("0.1,x", "is not a comma-separated list of numbers"),
                                       ("0.1,nan", "holds a value that is not finite"),
                                       ("0.1,5", "holds a value above --apart-max-step 1.0")])
def test_bad_per_block_starts_are_refused_before_the_run(text, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(apart=ApartConfig(a_layers=text)).validate()
