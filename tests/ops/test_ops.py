"""perturb_init, sign_step, pack_sign, layer_perturb and pgd_step on the CPU backends against the reference.

Forward outputs and elementwise gradients must equal the reference (same dtype, same ``g``) bit for bit;
step-size gradients follow the rule in conftest.py. Two data families: "random" (uniform/normal values,
with the clamps active on a part of the elements) and "bounds" (dyadic values, exact in every dtype,
chosen so that many elements sit exactly on a clamp bound, where PyTorch's convention decides).
"""

from __future__ import annotations

import pytest
import torch
from ops_testutil import DTYPES, SHAPES, assert_exact, assert_reduction, grid, rand, randn

from apart_fast import ops
from apart_fast.ops import reference as R

EPS = 8 / 255
CASES = ["random", "bounds"]
X_GRID = [k / 16 for k in range(17)] + [0.0, 1.0] * 4  # many saturated pixels
OMEGA_GRID = [k / 4 for k in range(-4, 5)]  # 0.25 * omega hits +-0.125 at omega = +-0.5
D_GRID = [k / 32 for k in range(-4, 5)]  # d + a*s with a = 1/16 hits +-1/8 at d = +-1/16


def _grads(outs, inputs, grad_outs):
    """Autograd of ``outs`` w.r.t. the inputs that require grad, given the output gradients (None: unused)."""
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
    need = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], need, [g for _, g in pairs], allow_unused=True)
    return list(got)


def _leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _init_data(case: str, shape, dtype, seed: int):
    if case == "random":
        x = rand(shape, dtype, seed)
        omega = rand(shape, dtype, seed + 1, -1.0, 1.0)
        return x, omega, torch.tensor(0.05), EPS
    return grid(shape, dtype, seed, X_GRID), grid(shape, dtype, seed + 1, OMEGA_GRID), torch.tensor(0.25), 0.125


def _step_data(case: str, shape, dtype, seed: int):
    g = randn(shape, dtype, seed + 2)
    if case == "random":
        x = rand(shape, dtype, seed)
        d = rand(shape, dtype, seed + 1, -EPS, EPS)
        return x, d, g, torch.tensor(0.01), EPS
    return grid(shape, dtype, seed, X_GRID), grid(shape, dtype, seed + 1, D_GRID), g, torch.tensor(1 / 16), 0.125


def _check_init(backend, x, omega, a, eps, go_x, go_d):
    """Compare forward, dL/dx and dL/da_init of one backend with the reference autograd."""
    dtype = x.dtype
    xs, as_ = _leaf(x), _leaf(a)
    out = ops.perturb_init(xs, omega, as_, eps, backend=backend)
    xr, ar = _leaf(x), _leaf(a)
    ref = R.perturb_init(xr, omega, ar, eps)
    assert_exact(out[0], ref[0], "x0")
    assert_exact(out[1], ref[1], "d0")
    gx, ga = _grads(out, [xs, as_], [go_x, go_d])
    rgx, rga = _grads(ref, [xr, ar], [go_x, go_d])
    assert_exact(gx, rgx, "dL/dx")
    assert ga.shape == a.shape and ga.dtype == a.dtype
    x64, a64 = _leaf(x.double()), _leaf(a.double())
    ref64 = R.perturb_init(x64, omega.double(), a64, eps)
    g64 = [None if g is None else g.double() for g in (go_x, go_d)]
    _, ga64 = _grads(ref64, [x64, a64], g64)
    abs_sum = sum((g.double().abs() * omega.double().abs()).sum().item() for g in g64 if g is not None)
    assert_reduction(ga, rga, ga64, x.numel(), abs_sum, dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_init(backend: str, dtype, shape, case: str) -> None:
    x, omega, a, eps = _init_data(case, shape, dtype, seed=1)
    go_x, go_d = randn(shape, dtype, 10, 0.0), randn(shape, dtype, 11, 0.0)
    _check_init(backend, x, omega, a, eps, go_x, go_d)
    _check_init(backend, x, omega, a, eps, go_x, None)  # d0 unused downstream: no gradient flows into it


def _check_step(backend, x, d, g, a, eps, go_x, go_d):
    dtype = x.dtype
    xs, ds, as_ = _leaf(x), _leaf(d), _leaf(a)
    out = ops.sign_step(xs, ds, g, as_, eps, backend=backend)
    xr, dr, ar = _leaf(x), _leaf(d), _leaf(a)
    ref = R.sign_step(xr, dr, g, ar, eps)
    assert_exact(out[0], ref[0], "x1")
    assert_exact(out[1], ref[1], "d1")
    gx, gd, ga = _grads(out, [xs, ds, as_], [go_x, go_d])
    rgx, rgd, rga = _grads(ref, [xr, dr, ar], [go_x, go_d])
    assert_exact(gx, rgx, "dL/dx")
    assert_exact(gd, rgd, "dL/dd")
    assert ga.shape == a.shape and ga.dtype == a.dtype
    x64, d64, a64 = _leaf(x.double()), _leaf(d.double()), _leaf(a.double())
    ref64 = R.sign_step(x64, d64, g.double(), a64, eps)
    _, gd64, ga64 = _grads(ref64, [x64, d64, a64], [None if t is None else t.double() for t in (go_x, go_d)])
    assert_reduction(ga, rga, ga64, x.numel(), gd64.abs().sum().item(), dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_step(backend: str, dtype, shape, case: str) -> None:
    x, d, g, a, eps = _step_data(case, shape, dtype, seed=2)
    go_x, go_d = randn(shape, dtype, 12, 0.0), randn(shape, dtype, 13, 0.0)
    _check_step(backend, x, d, g, a, eps, go_x, go_d)
    _check_step(backend, x, d, g, a, eps, go_x, None)


def test_chain_matches_reference(backend: str) -> None:
    """perturb_init then sign_step, one loss on x1: dL/da_in and dL/da_init through both ops (APART.md formulas)."""
    shape, dtype = (3, 3, 9, 7), torch.float64
    x, omega = grid(shape, dtype, 3, X_GRID), grid(shape, dtype, 4, OMEGA_GRID)
    g, go = randn(shape, dtype, 5), randn(shape, dtype, 6, 0.0)

    def run(fn_init, fn_step):
        a_init, a_in = _leaf(torch.tensor(0.25, dtype=dtype)), _leaf(torch.tensor(1 / 16, dtype=dtype))
        xl = _leaf(x)
        x0, d0 = fn_init(xl, omega, a_init, 0.125)
        x1, _ = fn_step(xl, d0, g, a_in, 0.125)
        return torch.autograd.grad(x1, [xl, a_init, a_in], go)

    ours = run(lambda *a: ops.perturb_init(*a, backend=backend), lambda *a: ops.sign_step(*a, backend=backend))
    ref = run(R.perturb_init, R.sign_step)
    assert_exact(ours[0], ref[0], "dL/dx")
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_sign(backend: str, dtype, shape) -> None:
    g = randn(shape, dtype, 7, zeros=0.2)
    g.view(-1)[0] = -0.0
    s = ops.pack_sign(g, backend=backend)
    assert_exact(s, R.pack_sign(g), "sign")


@pytest.mark.parametrize("a_shape", [(), (1,)], ids=["0d", "1elem"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_perturb(backend: str, dtype, shape, a_shape) -> None:
    h = randn(shape, dtype, 8, 0.0)
    s = R.pack_sign(randn(shape, dtype, 9))
    a = torch.full(a_shape, 0.0123)
    go = randn(shape, dtype, 14, 0.0)
    hs, as_ = _leaf(h), _leaf(a)
    out = ops.layer_perturb(hs, s, as_, backend=backend)
    hr, ar = _leaf(h), _leaf(a)
    ref = R.layer_perturb(hr, s, ar)
    if a_shape == () or dtype in (torch.float32, torch.float64):
        assert_exact(out, ref, "out")
    else:  # a (1,)-shaped fp32 step size makes the reference compute a*s in fp32: one rounding apart
        torch.testing.assert_close(out, ref, rtol=0, atol=2 * torch.finfo(dtype).eps * (h.abs().max().item() + 1))
    gh, ga = torch.autograd.grad(out, [hs, as_], go)
    rgh, rga = torch.autograd.grad(ref, [hr, ar], go)
    assert_exact(gh, rgh, "dL/dh")
    assert ga.shape == a.shape and ga.dtype == a.dtype
    h64, a64 = _leaf(h.double()), _leaf(a.double())
    _, ga64 = torch.autograd.grad(R.layer_perturb(h64, s, a64), [h64, a64], go.double())
    assert_reduction(ga, rga, ga64, h.numel(), go.double().abs().sum().item(), dtype)


def test_layer_perturb_grad_h_is_grad_out(fused: str) -> None:
    """dL/dh is dL/dout itself (no copy) and only the int8 sign is saved."""
    h, s, go = _leaf(torch.randn(2, 3, 4, 5)), R.pack_sign(torch.randn(2, 3, 4, 5)), torch.randn(2, 3, 4, 5)
    a = _leaf(torch.tensor(0.5))
    out = ops.layer_perturb(h, s, a, backend=fused)
    saved = [t for t in (out.grad_fn.saved_tensors or ())]
    assert len(saved) == 1 and saved[0].dtype == torch.int8
    (gh,) = torch.autograd.grad(out, [h], go, retain_graph=True)
    assert gh.data_ptr() == go.data_ptr()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pgd_step(backend: str, dtype, shape, case: str) -> None:
    if case == "random":
        x = rand(shape, dtype, 15)
        x_adv = (x.double() + rand(shape, torch.float64, 16, -EPS, EPS)).clamp(0, 1).to(dtype)
        step, eps = 2 / 255, EPS
    else:
        x, x_adv = grid(shape, dtype, 15, X_GRID), grid(shape, dtype, 16, X_GRID)
        step, eps = 1 / 8, 1 / 16
    g = randn(shape, dtype, 17)
    new = ops.pgd_step(x_adv, x, g, step, eps, backend=backend)
    assert not new.requires_grad
    assert_exact(new, R.pgd_step(x_adv, x, g, step, eps), "pgd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_contiguous_inputs(backend: str, dtype) -> None:
    """t[::2] and transposed inputs (and a transposed grad_out) give the reference's values and gradients."""
    base = rand((4, 3, 10, 12), dtype, 20)
    x = base[::2].transpose(2, 3)  # (2, 3, 12, 10), strided
    omega = rand((2, 3, 10, 12), dtype, 21, -1, 1).transpose(2, 3)
    d = rand((2, 3, 24, 10), dtype, 22, -EPS, EPS)[:, :, ::2]
    g = randn((2, 3, 10, 12), dtype, 23).transpose(2, 3)
    go = randn((2, 3, 10, 12), dtype, 24, 0.0).transpose(2, 3)
    _check_init(backend, x, omega, torch.tensor(0.05), EPS, go, go)
    _check_step(backend, x, d, g, torch.tensor(0.01), EPS, go, go)
    assert_exact(ops.pgd_step(x + d, x, g, 0.01, EPS, backend=backend), R.pgd_step(x + d, x, g, 0.01, EPS), "pgd")
    assert_exact(ops.pack_sign(g, backend=backend), R.pack_sign(g), "sign")
    s = R.pack_sign(g)
    h = _leaf(x)
    out = ops.layer_perturb(h, s, torch.tensor(0.5), backend=backend)
    assert_exact(out, R.layer_perturb(x, s, torch.tensor(0.5)), "layer")
    (gh,) = torch.autograd.grad(out, [h], go)
    assert_exact(gh, go, "dL/dh")


def test_one_element_step_sizes(backend: str) -> None:
    """(1,)-shaped step sizes: the gradient keeps the step size's shape and dtype."""
    x, omega = rand((2, 3, 4, 4), torch.float32, 30), rand((2, 3, 4, 4), torch.float32, 31, -1, 1)
    a = _leaf(torch.tensor([0.05]))
    x0, d0 = ops.perturb_init(x, omega, a, EPS, backend=backend)
    (ga,) = torch.autograd.grad(x0.sum() + d0.sum(), [a])
    assert ga.shape == (1,) and ga.dtype == torch.float32
    ar = _leaf(torch.tensor([0.05]))
    x0r, d0r = R.perturb_init(x, omega, ar, EPS)
    (gar,) = torch.autograd.grad(x0r.sum() + d0r.sum(), [ar])
    torch.testing.assert_close(ga, gar, rtol=1e-5, atol=1e-6)


def test_backward_deterministic(fused: str) -> None:
    """The same inputs give bit-identical step-size gradients (fixed chunking, no atomics)."""
    x, d, g = rand((8, 64, 32, 32), torch.float32, 40), rand((8, 64, 32, 32), torch.float32, 41, -EPS, EPS), \
        randn((8, 64, 32, 32), torch.float32, 42)
    go = randn((8, 64, 32, 32), torch.float32, 43, 0.0)
    res = []
    for _ in range(2):
        a = _leaf(torch.tensor(0.01))
        x1, d1 = ops.sign_step(x, d, g, a, EPS, backend=fused)
        res.append(torch.autograd.grad(x1, [a], go)[0])
    assert_exact(res[0], res[1], "dL/da")


# eps = 8/255 is not an fp16/bf16 number: its rounding decides the masks and the projection where a bound binds.
E8 = 8 / 255


def landing_case(dtype: torch.dtype, device: str = "cpu", rounds: str = "down"):
    """Data whose d + a*s (a = 2^-6) and a_init*omega (a_init = 1/2) land exactly on eps rounded to the dtype, below
    eps itself (``rounds="down"``) or above it (``"up"``, as bf16 rounds 8/255), mixed with random elements:
    ``(x, d, g, omega, go_x, go_d, eps, a_val)``. Where a clamp passes the gradient at its bound, "up" tells an fp32
    bound from the rounded one; where it does not, "down" does."""
    a_val = 2.0**-6  # exact in every dtype: e - a is exact too (Sterbenz), so d + a lands on e
    e_lo = torch.tensor(E8, dtype=dtype).item()
    e_hi = torch.nextafter(torch.tensor(e_lo, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()
    if rounds == "down":  # rounds down to e_lo in the dtype, and in fp32 stays above it
        eps, e = e_lo + (e_hi - e_lo) / 4, e_lo
    else:  # rounds up to e_hi in the dtype, and in fp32 stays below it
        eps, e = e_hi - (e_hi - e_lo) / 4, e_hi
    n = 600
    d = torch.full((n,), e - a_val, dtype=torch.float64)  # sign_step: d + a_val lands on e
    d[2::4] = e  # perturb_init (omega = 2d, a_init = 1/2): a_init*omega lands on e
    d[1::2] = rand((n // 2,), torch.float64, 50, -E8, E8)  # random d: sums that round differently
    d = d.to(dtype).reshape(2, 3, 10, 10)
    g = torch.ones(d.shape, dtype=dtype)
    g.view(-1)[1::2] = randn((n // 2,), dtype, 51)
    x = rand(d.shape, dtype, 52, 0.1, 0.9)
    omega = (d.double() * 2).to(dtype)
    go_x, go_d = randn(d.shape, dtype, 53, 0.0), randn(d.shape, dtype, 54, 0.0)
    return (*(t.to(device) for t in (x, d, g, omega, go_x, go_d)), eps, a_val)


def check_landing(backend: str, dtype: torch.dtype, a_shape, device: str = "cpu", rounds: str = "down") -> None:
    """Forward, elementwise gradients and step-size gradients of sign_step and perturb_init on ``landing_case``."""
    x, d, g, omega, go_x, go_d, eps, a_val = landing_case(dtype, device, rounds)

    def step(v: float) -> torch.Tensor:
        return torch.full(a_shape, v, device=device)

    _check_step(backend, x, d, g, step(0.0123), eps, go_x, go_d)
    _check_step(backend, x, d, g, step(a_val), eps, go_x, go_d)  # the exact landing on e_lo
    _check_init(backend, x, omega, step(0.5), eps, go_x, go_d)
    _check_init(backend, x, omega, step(0.0123 * 4), eps, go_x, None)


@pytest.mark.parametrize("rounds", ["down", "up"])
@pytest.mark.parametrize("a_shape", [(), (1,)], ids=["0d", "1elem"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_step_shape_conventions_where_eps_binds(backend: str, dtype, a_shape, rounds) -> None:
    """A 0-d step size rounds to the data's dtype (and so do d + a*s and the clamp bound eps); a (1,) one computes in
    fp32 against an fp32 eps. Elements land exactly on eps rounded to the dtype, below or above the fp32 eps: the
    mask there tells the two conventions apart, and the random part tells their roundings apart."""
    check_landing(backend, dtype, a_shape, rounds=rounds)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pgd_projection_binds(backend: str, dtype) -> None:
    """x_adv = x and a step of 2 eps: every moved element is projected onto x -+ eps, whose rounding (eps rounded to
    the dtype first on the CPU) shows in the result."""
    x = rand((4, 3, 9, 11), dtype, 55, 0.05, 0.95)
    g = randn(x.shape, dtype, 56)
    new = ops.pgd_step(x, x, g, 2 * E8, E8, backend=backend)
    assert_exact(new, R.pgd_step(x, x, g, 2 * E8, E8), "pgd")
    assert bool((new != x).float().mean() > 0.9)
