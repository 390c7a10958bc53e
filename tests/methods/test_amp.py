"""Mixed precision: APART's step-size gradients (which the ascent steps on) come out of the fp16
loss-scaled backward unscaled and agree with fp32 on the same batch; an fp16 overflow skips the
step without counting as a numeric fault and backs the scale off."""

from __future__ import annotations

import pytest
import torch

from apart_fast import ops
from apart_fast.config import ApartConfig
from apart_fast.step.amp import Precision
from apart_fast.step.distributed import LOCAL

APART = ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e-3, weight_decay=0.0)


def step_size_grads(make, images, mode: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dL2/da for a_init, a_in, a_layer; dL2/dx1; the batch's omega) after ``finish_backward`` in ``mode``."""
    torch.set_num_threads(1)
    method, loader = make("apart", *images, apart=APART)
    method.use(Precision(mode), LOCAL)
    batch = next(iter(loader))
    omega = ops.omega_gather(method.store, batch.index, batch.crop, batch.flip, batch.x.shape[-2:], backend="torch")
    loss2, _, g_x1, ratio = method.forward_backward(batch)
    ok = method.finish_backward(loss2, method.update_grads(), [g_x1, ratio])
    assert bool(ok)
    return [p.grad.detach().clone() for p in method.step_sizes()], g_x1, omega


@pytest.mark.parametrize("mode, rtol", [("fp16", 2e-2), ("bf16", 1.6e-1)])
def test_low_precision_step_size_gradients_match_fp32(make, images, mode, rtol):
    """Tolerance: fp16 keeps 11 mantissa bits (unit roundoff 4.9e-4); the forward activations pass
    through ~6 rounded layers and the gradient back through as many, so ~1e-2 relative error in
    each term of the sums that make dL2/da is expected (measured: <= 0.7% for a_in and a_layer);
    bf16 has 3 bits fewer, so 8x. dL2/da_init = sum(dL2/dx1 * masks * omega) with omega ~ N(0, 1e-3)
    cancels almost completely (the result is ~1e-2 of its terms' absolute sum), so its error is
    bounded against that absolute sum instead of the result (measured 2% of the result, 1e-4 of the sum).
    Without unscaling, the gradients would be 65536x too large; without the scaled loss, fp16
    input gradients would underflow to sign 0."""
    ref, g_x1, omega = step_size_grads(make, images, "none")
    got, _, _ = step_size_grads(make, images, mode)
    abs_sum_init = float((g_x1 * omega).abs().sum())
    assert abs(float(got[0] - ref[0])) <= rtol * abs_sum_init
    torch.testing.assert_close(got[1], ref[1], rtol=rtol, atol=0.0)
    torch.testing.assert_close(got[2], ref[2], rtol=rtol, atol=0.0)


def test_fp16_overflow_skips_the_step_without_a_fault(make, images):
    torch.set_num_threads(1)
    method, loader = make("apart", *images, apart=APART)
    method.use(Precision("fp16"), LOCAL)
    method.precision.scaler.scale.fill_(3e38)  # the scaled loss overflows fp32: every gradient is inf/nan
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    sizes = [p.detach().clone() for p in method.step_sizes()]
    store = method.store.clone()
    method.step(next(iter(loader)))
    assert not bool(method.step_ok) and not bool(method.step_fault)
    assert float(method.precision.scaler.scale) == pytest.approx(1.5e38)
    for k, v in method.model.named_parameters():
        assert torch.equal(v, before[k]), k
    for p, s in zip(method.step_sizes(), sizes):
        assert torch.equal(p, s)
    assert torch.equal(method.store, store)
