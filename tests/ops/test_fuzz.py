"""Hypothesis fuzz of the CPU backends against the reference: shapes, eps, step sizes, dtypes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_testutil import BACKENDS_CPU, assert_exact, assert_reduction

from apart_fast import ops
from apart_fast.ops import reference as R

SETTINGS = settings(max_examples=30, deadline=None)
dtypes = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])
shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
eps_values = st.one_of(st.sampled_from([8 / 255, 1.0, 0.125]), st.floats(1e-3, 1.0))
steps = st.one_of(st.sampled_from([0.0, 1 / 16, -1 / 16]), st.floats(-0.2, 0.2, allow_subnormal=False))
backends = st.sampled_from(BACKENDS_CPU)


def _data(shape, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x[torch.rand(shape, generator=g) < 0.2] = 1.0  # saturated pixels
    d = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.2
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), d.to(dtype), grad.to(dtype), go.to(dtype)


@SETTINGS
@given(backend=backends, dtype=dtypes, shape=shapes, eps=eps_values, a=steps, seed=st.integers(0, 2**16))
def test_sign_step_fuzz(backend: str, dtype, shape, eps: float, a: float, seed: int) -> None:
    x, d, g, go = _data(shape, dtype, seed)
    res = []
    for fn in (lambda *t: ops.sign_step(*t, backend=backend), R.sign_step):
        xl, dl, al = x.clone().requires_grad_(), d.clone().requires_grad_(), torch.tensor(a, requires_grad=True)
        out = fn(xl, dl, g, al, eps)
        res.append((out, torch.autograd.grad(out, [xl, dl, al], [go, go])))
    (o, gr), (ro, rgr) = res
    for u, v, what in zip(o + gr[:2], ro + rgr[:2], ["x1", "d1", "dL/dx", "dL/dd"]):
        assert_exact(u, v, what)
    x64, d64, a64 = x.double().requires_grad_(), d.double().requires_grad_(), torch.tensor(a, dtype=torch.float64,
                                                                                            requires_grad=True)
    out64 = R.sign_step(x64, d64, g.double(), a64, eps)
    _, gd64, ga64 = torch.autograd.grad(out64, [x64, d64, a64], [go.double(), go.double()])
    assert_reduction(gr[2], rgr[2], ga64, x.numel(), gd64.abs().sum().item(), dtype)


@SETTINGS
@given(backend=backends, dtype=dtypes, shape=shapes, eps=eps_values, a=steps, seed=st.integers(0, 2**16))
def test_perturb_init_fuzz(backend: str, dtype, shape, eps: float, a: float, seed: int) -> None:
    x, omega, _, go = _data(shape, dtype, seed)
    omega = (omega * 5).clamp(-1, 1)
    res = []
    for fn in (lambda *t: ops.perturb_init(*t, backend=backend), R.perturb_init):
        xl, al = x.clone().requires_grad_(), torch.tensor(a, requires_grad=True)
        out = fn(xl, omega, al, eps)
        res.append((out, torch.autograd.grad(out, [xl, al], [go, go])))
    (o, gr), (ro, rgr) = res
    for u, v, what in zip(o + gr[:1], ro + rgr[:1], ["x0", "d0", "dL/dx"]):
        assert_exact(u, v, what)
    x64, a64 = x.double().requires_grad_(), torch.tensor(a, dtype=torch.float64, requires_grad=True)
    (ga64,) = torch.autograd.grad(R.perturb_init(x64, omega.double(), a64, eps), [a64], [go.double(), go.double()])
    assert_reduction(gr[1], rgr[1], ga64, x.numel(), 2 * (go.double().abs() * omega.double().abs()).sum().item(), dtype)


@SETTINGS
@given(backend=backends, dtype=dtypes, shape=shapes, eps=eps_values, step=steps, seed=st.integers(0, 2**16))
def test_pgd_and_layer_fuzz(backend: str, dtype, shape, eps: float, step: float, seed: int) -> None:
    x, d, g, go = _data(shape, dtype, seed)
    x_adv = (x + d).clamp(0, 1)
    assert_exact(ops.pgd_step(x_adv, x, g, step, eps, backend=backend), R.pgd_step(x_adv, x, g, step, eps), "pgd")
    s = ops.pack_sign(g, backend=backend)
    assert_exact(s, R.pack_sign(g), "sign")
    a = torch.tensor(step)
    assert_exact(ops.layer_perturb(x, s, a, backend=backend), R.layer_perturb(x, s, a), "layer")


@SETTINGS
@given(backend=backends, dtype=dtypes, b=st.integers(1, 6), n=st.integers(1, 6), pad=st.integers(0, 3),
       hw=st.tuples(st.integers(1, 6), st.integers(1, 6)), ratio=steps, seed=st.integers(0, 2**16))
def test_omega_fuzz(backend: str, dtype, b: int, n: int, pad: int, hw, ratio: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    store = (torch.rand(n, 2, h + 2 * pad, w + 2 * pad, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    index = torch.randint(n, (b,), generator=g)
    crop = torch.randint(2 * pad + 1, (b, 2), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    grad = torch.randn(b, 2, h, w, generator=g).to(dtype)
    assert_exact(ops.omega_gather(store, index, crop, flip, (h, w), backend=backend),
                 R.omega_gather(store, index, crop, flip, (h, w)), "gather")
    ours, ref = store.clone(), store.clone()
    ops.omega_update(ours, index, crop, flip, grad, ratio, backend=backend)
    R.omega_update(ref, index, crop, flip, grad, ratio)
    assert_exact(ours, ref, "store")
