"""APART against an independent autograd computation of the same equations (../shared/APART.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apart_fast.config import ApartConfig
from apart_fast.models import PreActBlock


def window(store, index, crop, flip, h, w):
    """Per-example slow reference of the store window (crop, then flip)."""
    out = []
    for i, (dy, dx), f in zip(index.tolist(), crop.tolist(), flip.tolist()):
        win = store[i, :, dy : dy + h, dx : dx + w]
        out.append(win.flip(-1) if f else win)
    return torch.stack(out)


def independent_apart(method, batch):
    """APART's step-size and parameter gradients from plain autograd: hooks on each block's conv1 instead of
    sites, torch ops only."""
    model, eps = method.model, method.cfg.eps
    a_init = method.a_init.detach().clone().requires_grad_(True)
    a_in = method.a_in.detach().clone().requires_grad_(True)
    a_layer = method.a_layer.detach().clone().requires_grad_(True)
    x, y = batch.x, batch.y
    omega = window(method.store, batch.index, batch.crop, batch.flip, x.shape[-2], x.shape[-1])
    d0 = torch.clamp(a_init * omega, -eps, eps)
    x0 = torch.clamp(x + d0, 0, 1)
    hs = []
    convs = [m.conv1 for m in model.modules() if isinstance(m, PreActBlock)]  # each takes its block's site activation
    assert len(convs) == len(method.sites)

    def tap(m, i):  # dL/dh_b along the site's path only: a projection shortcut may read h_b too
        hs.append(i[0].view_as(i[0]))
        return (hs[-1],)

    handles = [c.register_forward_pre_hook(tap) for c in convs]
    x0l = x0.detach().requires_grad_(True)
    loss1 = F.cross_entropy(model(x0l), y)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(loss1, [x0l, *hs])
    d1 = torch.clamp(d0 + a_in * torch.sign(grads[0]), -eps, eps)
    x1 = torch.clamp(x + d1, 0, 1)
    signs = [torch.sign(g) for g in grads[1:]]
    handles = [c.register_forward_pre_hook(lambda m, i, k=k: (i[0] + a_layer[k] * signs[k],)) for k, c in enumerate(convs)]
    loss2 = F.cross_entropy(model(x1), y)
    for h in handles:
        h.remove()
    params = list(model.parameters())
    g = torch.autograd.grad(loss2, [a_init, a_in, a_layer, x1, *params])
    return g[0], g[1], g[2], g[3], g[4:]


def test_step_size_and_parameter_gradients_match_independent_autograd(images, make):
    x, y = images
    method, loader = make("apart", x.clone(), y, dtype=torch.float64, backend="torch")
    batch = next(iter(loader))
    batch.x = batch.x.double()
    # make the store non-trivial so every clamp is exercised
    method.store.uniform_(-1, 1)
    with torch.no_grad():
        method.a_init.fill_(0.05)
        method.a_in.fill_(0.02)
        method.a_layer.copy_(torch.linspace(-0.1, 0.1, len(method.sites), dtype=torch.float64))
    g_init, g_in, g_layer, g_x1, g_params = independent_apart(method, batch)
    _, _, got_x1, ratio = method.forward_backward(batch)
    torch.testing.assert_close(method.a_init.grad, g_init, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(method.a_in.grad, g_in, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(method.a_layer.grad, g_layer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_x1, g_x1, rtol=1e-10, atol=1e-12)
    # pass-1 parameter gradients never reach the optimizer: .grad is exactly pass 2's
    for p, g in zip(method.model.parameters(), g_params):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert float(ratio) == 0.02 / (0.05 + 1e-7)  # the script's ratio
    assert g_in.abs() > 0 and g_init.abs() > 0 and g_layer.abs().sum() > 0


def test_step_sizes_move_in_the_ascent_direction(images, make):
    x, y = images
    apart = ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e-4, weight_decay=0.0)
    method, loader = make("apart", x, y, dtype=torch.float64, apart=apart, momentum=0.0, momentum_low=0.0)
    method.gen_schedule.t = 50  # peak lr
    method.gen_schedule.step()
    batch = next(iter(loader))
    batch.x = batch.x.double()
    before = [p.detach().clone() for p in method.step_sizes()]
    method.forward_backward(batch)
    grads = [p.grad.clone() for p in method.step_sizes()]
    lr = method.gen_optimizer.param_groups[0]["lr"]
    method._ascend()
    for b, g, p in zip(before, grads, method.step_sizes()):
        torch.testing.assert_close(p.detach() - b, lr * g, rtol=1e-9, atol=1e-15)  # ascent: a += lr * dL/da


def test_omega_update_lands_on_the_right_pixels(images, make):
    x, y = images
    method, loader = make("apart", x, y)
    batch = next(iter(loader))
    old = method.store.clone()
    _, _, g_x1, ratio = method.forward_backward(batch)
    from apart_fast import ops

    ops.omega_update(method.store, batch.index, batch.crop, batch.flip, g_x1, ratio, backend="torch")
    h, w = x.shape[-2:]
    expected = old.clone()
    for b, (i, (dy, dx), f) in enumerate(zip(batch.index.tolist(), batch.crop.tolist(), batch.flip.tolist())):
        win = old[i, :, dy : dy + h, dx : dx + w]
        win = win.flip(-1) if f else win
        new = torch.clamp(win + ratio * torch.sign(g_x1[b]), -1, 1)
        expected[i, :, dy : dy + h, dx : dx + w] = new.flip(-1) if f else new
    assert torch.equal(method.store, expected)
    untouched = torch.ones(old.shape[0], dtype=torch.bool)
    untouched[batch.index] = False
    assert torch.equal(method.store[untouched], old[untouched])


def test_freeze_bn_pass1_keeps_running_stats_through_pass1(images, make):
    x, y = images
    apart = ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, freeze_bn_pass1=True)
    method, loader = make("apart", x, y, apart=apart)
    bn = next(m for m in method.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = [b.clone() for b in bn.buffers()]
    method._pass1(next(iter(loader)))
    assert all(torch.equal(b, old) for b, old in zip(bn.buffers(), before))  # num_batches_tracked included
    assert bn.momentum == 0.1 and bn.track_running_stats
    method.step(next(iter(loader)))
    assert not torch.equal(bn.running_mean, before[0])  # pass 2 still updates them


def test_pass1_drops_the_recorded_activations(images, make):
    x, y = images
    method, loader = make("apart", x, y)
    method.perturb(next(iter(loader)))
    assert method.sites and all(s.recorded is None for s in method.sites)


def test_no_layer_perturb_ablation_and_missing_sites(images, make):
    x, y = images
    apart = ApartConfig(a_init=0.01, a_in=0.01, layer_perturb=False)
    method, loader = make("apart", x, y, apart=apart)
    assert method.sites == [] and method.a_layer.numel() == 0
    method.step(next(iter(loader)))


def test_compiled_model_trains_and_matches_eager(images, make):
    """``--compile``: pass 1 takes dL/dh at every site through the compiled model (the sites record
    outside the graph), and two steps give eager's model, step sizes and store."""
    x, y = images
    eager, loader = make("apart", x.clone(), y, backend="torch")
    compiled, _ = make("apart", x.clone(), y, backend="torch")
    torch._dynamo.reset()
    compiled.model = torch.compile(compiled.model, backend="aot_eager")
    for batch in list(loader)[:2]:
        m_e = eager.step(batch)
        m_c = compiled.step(batch)
        torch.testing.assert_close(m_c["loss"], m_e["loss"], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in compiled.step_sizes())  # the ascent ran and cleared them
    for a, b in zip(compiled.step_sizes(), eager.step_sizes()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(eager.a_layer, torch.full_like(eager.a_layer, 0.01))  # the step sizes did move
    for a, b in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.store, eager.store, rtol=0, atol=1e-6)
