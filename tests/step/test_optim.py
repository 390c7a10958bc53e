"""FlatSGD and BufferGuard: flat views, torch.optim.SGD's update and checkpoint format, bit-exact skips,
and a per-step launch count that does not grow with the number of tensors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from apart_fast.bench.launches import count_launches
from apart_fast.step.guard import BufferGuard, conditional_step, finite_flag, gather_grads
from apart_fast.step.optim import FlatSGD, FusedSGD


def params(n: int = 3, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (7,), (5, 2)] * n
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes[:n]]


@pytest.mark.parametrize("maximize", [False, True])
def test_flat_sgd_matches_torch_sgd(maximize):
    a, b = params(), params()
    opt_a = torch.optim.SGD(a, lr=0.1, momentum=0.9, weight_decay=0.01, maximize=maximize)
    opt_b = FlatSGD(b, lr=0.1, momentum=0.9, weight_decay=0.01, maximize=maximize)
    assert all(p.untyped_storage().data_ptr() == opt_b.flat_params.untyped_storage().data_ptr() for p in b)
    for i in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)  # torch rounds mu*buf before adding: ~1 ulp
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for i in sa["state"]:
        torch.testing.assert_close(sb["state"][i]["momentum_buffer"], sa["state"][i]["momentum_buffer"], rtol=1e-6, atol=1e-6)
    c = params()
    opt_c = torch.optim.SGD(c, lr=0.1, momentum=0.9, weight_decay=0.01, maximize=maximize)
    opt_c.load_state_dict(sb)  # the checkpoint format is torch's
    opt_b.load_state_dict(sa)
    for i, p in enumerate(b):
        assert opt_b.state[p]["momentum_buffer"].data_ptr() == opt_b.momentum_views[i].data_ptr()  # still flat
        assert torch.equal(opt_b.state_dict()["state"][i]["momentum_buffer"], sa["state"][i]["momentum_buffer"])


@pytest.mark.parametrize("maximize", [False, True])
def test_fused_sgd_skips_on_the_flag_and_stays_fused(maximize):
    a, b = params(), params()
    ref = torch.optim.SGD(a, lr=0.1, momentum=0.9, weight_decay=0.01, maximize=maximize)
    opt = FusedSGD(b, lr=0.1, momentum=0.9, weight_decay=0.01, maximize=maximize)
    for p in b:
        p.grad = torch.full_like(p, float("nan"))
    opt.step_if(finite_flag(torch.tensor(1.0), [p.grad for p in b]))  # a skipped first step: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in b)
    for i in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
            q.grad = p.grad.clone()
        ref.step()
        opt.step_if(torch.tensor(True))
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    before = [p.detach().clone() for p in b] + [opt.state[p]["momentum_buffer"].clone() for p in b]
    opt.step_if(torch.tensor(False))
    assert all(torch.equal(x, y) for x, y in zip(before, [p.detach() for p in b] + [opt.state[p]["momentum_buffer"] for p in b]))
    opt.load_state_dict(ref.state_dict())  # an unfused checkpoint: values loaded, the update stays fused
    assert opt.param_groups[0]["fused"] and not hasattr(opt, "found_inf")


def test_skipped_step_is_bit_exact_and_params_without_grad_stay():
    b = params()
    opt = FlatSGD(b, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.sync_free = True  # the accelerator's torch.where path, on the CPU
    for p in b:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [t.clone() for t in (opt.flat_params, opt.flat_momentum)]
    for p in b:
        p.grad = torch.full_like(p, float("nan"))
    grads = opt.gather_grads()
    ok = finite_flag(torch.tensor(1.0), grads)
    assert not bool(ok)
    conditional_step(opt, ok)
    assert torch.equal(opt.flat_params, before[0]) and torch.equal(opt.flat_momentum, before[1])
    b[1].grad = None  # torch.optim.SGD skips a parameter without a gradient: no decay, no momentum
    kept = (b[1].detach().clone(), opt.state[b[1]]["momentum_buffer"].clone())
    for p in (b[0], b[2]):
        p.grad = torch.randn_like(p)
    opt.step_if(torch.tensor(True))
    assert torch.equal(b[1].detach(), kept[0]) and torch.equal(opt.state[b[1]]["momentum_buffer"], kept[1])
    assert not torch.equal(b[0].detach(), before[0][: b[0].numel()].view_as(b[0]))


def test_layouts_shared_params_and_replaced_tensors():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    own = nn.Parameter(torch.randn(4))
    shared = nn.Parameter(torch.randn(2))
    other = FlatSGD([shared], lr=0.0, momentum=0.9)  # holds ``shared`` flat
    opt = FlatSGD([conv.weight, conv.bias, own, shared], lr=0.1, momentum=0.9, shared=[shared])
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert shared.data_ptr() == other.flat_params.data_ptr()  # left where it is
    for p in (conv.weight, conv.bias, own, shared):
        p.grad = torch.ones_like(p)
    old_shared = shared.detach().clone()
    opt.step()
    torch.testing.assert_close(shared.detach(), old_shared - 0.1)
    own.data = own.data.clone()  # a replaced tensor: the optimizer follows it
    for p in (conv.weight, conv.bias, own, shared):
        p.grad = torch.ones_like(p)
    old = own.detach().clone()
    opt.step()
    assert own.data_ptr() == opt.views[2].data_ptr() and not torch.equal(own.detach(), old)
    own.data = own.data.double()
    with pytest.raises(ValueError, match="one dtype"):
        opt.step()


def test_gradients_accumulated_in_place_into_the_flat_views():
    """zero_grad(set_to_none=False): the next backward adds into the ``.grad`` views, which the step uses as they are."""
    lin = nn.Linear(3, 2)
    ref = nn.Linear(3, 2)
    ref.load_state_dict(lin.state_dict())
    opt, ref_opt = FlatSGD(lin.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)
    for _ in range(3):
        for m, o in ((lin, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=False)
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert lin.weight.grad.data_ptr() == opt.flat_grads.data_ptr()


def test_buffer_guard_restores_bit_exactly_and_checkpoints_as_before():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    guard = BufferGuard(model)
    assert len(guard.flats) == 2  # float32 statistics, int64 num_batches_tracked
    model(torch.randn(2, 3, 6, 6))
    guard.snapshot()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.full((2, 3, 6, 6), float("nan")))
    guard.restore_unless(torch.tensor(False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    fresh.load_state_dict(torch.load(buf))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_finite_flag_leaves_its_tensors_alone():
    ts = [torch.randn(5), torch.tensor(-0.0), torch.randn(3, 4).t()]
    copies = [t.clone() for t in ts]
    assert bool(finite_flag(torch.tensor(1.0), ts))
    assert all(torch.equal(a, b) and a.signbit().equal(b.signbit()) for a, b in zip(ts, copies))
    ts[2][1, 1] = float("inf")
    assert not bool(finite_flag(torch.tensor(1.0), ts))
    assert not bool(finite_flag(torch.tensor(float("nan")), ts[:2]))


@pytest.mark.parametrize("cls", [FlatSGD, FusedSGD])
@pytest.mark.parametrize("sync_free", [False, True])
def test_step_launches_do_not_grow_with_the_number_of_tensors(cls, sync_free):
    """Check, update and keep-or-undo: the same handful of kernels for 3 tensors or 30."""
    counts = []
    for n in (3, 30):
        ps = params(n)
        opt = cls(ps, lr=0.1, momentum=0.9, weight_decay=0.01)
        opt.sync_free = sync_free
        for p in ps:
            p.grad = torch.randn_like(p)

        def step(opt=opt) -> None:
            ok = finite_flag(torch.tensor(1.0), gather_grads(opt))
            opt.step_if(ok)

        counts.append(count_launches(step, torch.device("cpu"))["total"])
    assert counts[0] == counts[1] <= 9, counts
