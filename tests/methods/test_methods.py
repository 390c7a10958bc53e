"""Every method's perturbation stays within its L-inf bound (eps; N-FGSM's is larger) and in [0,1], labels are
untouched, and a step trains."""

from __future__ import annotations

import pytest
import torch

from apart_fast.methods import METHOD_CLASSES


@pytest.mark.parametrize("name", sorted(METHOD_CLASSES))
def test_invariants_after_every_step(name, images, make):
    x, y = images
    method, loader = make(name, x, y)
    eps = method.linf_bound
    assert eps == method.cfg.eps or name == "nfgsm"
    for batch in loader:
        y_before = batch.y.clone()
        x_adv = method.perturb(batch)
        assert x_adv.shape == batch.x.shape
        assert (x_adv - batch.x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        m = method.step(batch)
        assert torch.equal(batch.y, y_before)
        assert torch.isfinite(m["loss"]) and int(m["n"]) == len(batch)
    # after steps, the perturbation is still inside the ball
    batch = next(iter(loader))
    assert (method.perturb(batch) - batch.x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("name", sorted(METHOD_CLASSES))
def test_step_changes_the_model(name, images, make):
    x, y = images
    method, loader = make(name, x, y)
    method.schedule.t = 50  # peak learning rate
    method.schedule.step()
    before = [p.detach().clone() for p in method.model.parameters()]
    method.step(next(iter(loader)))
    assert any(not torch.equal(b, p) for b, p in zip(before, method.model.parameters()))


def test_attack_gradients_take_no_parameter_grads(images, make):
    x, y = images
    method, loader = make("pgd", x, y)
    method.perturb(next(iter(loader)))
    assert all(p.grad is None for p in method.model.parameters())


def test_free_passes_and_data_divisor(images, make):
    x, y = images
    method, _ = make("free", x, y)
    assert method.passes == 2 and method.data_passes_divisor == 2


def test_free_perturbation_is_one_buffer_updated_in_place(images, make):
    """Free's carried perturbation keeps one address across replays and batches (what a captured step reads and
    writes at every replay); a smaller batch uses and updates the first rows of it (Shafahi et al.'s global noise)."""
    x, y = images
    method, loader = make("free", x, y)
    batches = iter(loader)
    method.step(next(batches))
    buf = method.delta
    assert buf is not None and bool(buf.abs().sum() > 0)
    method.step(next(batches))
    assert method.delta is buf
    small = next(batches)
    for f in ("x", "y", "index", "crop", "flip"):
        setattr(small, f, getattr(small, f)[:3])
    before = buf.clone()
    method.step(small)
    assert method.delta is buf and torch.equal(buf[3:], before[3:]) and not torch.equal(buf[:3], before[:3])
