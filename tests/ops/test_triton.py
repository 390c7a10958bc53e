"""Triton kernels (``apart_fast.kernels``) against the pure-PyTorch reference and its autograd.

Without a CUDA device the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set below, before Triton is
imported); with one, the same tests run on CUDA tensors (marker ``gpu``) and add bf16.

Exactness: the kernels round to the storage dtype wherever the reference holds a tensor of that dtype, and round
a Python-scalar eps as the reference's kernels on the same device do (pgd_step's ``x -+ eps``: to fp16/bf16 first on
the CPU, kept in fp32 on CUDA; a clamp bound: to the clamped tensor's dtype on both, as autograd's masks compare),
so given the same ``g`` every sign/clamp/mask path and every elementwise output equals the reference on that device
bit for bit; only the step-size reductions (``dL/da``) carry a tolerance, justified where it is used.
"""

from __future__ import annotations

import math
import os
import sys

import torch

if not torch.cuda.is_available():
    # must precede the first import of triton and of any kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot run")

from apart_fast.ops import reference as R  # noqa: E402

try:
    import apart_fast.kernels as K
except ModuleNotFoundError:  # source checkout that was not pip-installed: kernels/ is importable from the root
    import kernels as K  # type: ignore[no-redef]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.sum, InterpretedFunction):
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set (by another test module?): set it in the "
            "environment or in tests/conftest.py to run the kernels on the CPU",
            allow_module_level=True,
        )

_UTILS = sys.modules[f"{K.__name__}._utils"]
BLOCK_SIZE: int = _UTILS.BLOCK_SIZE
# PyTorch's clamp passes the gradient at exactly a bound in some versions and not in others (2.14: not);
# the kernels follow the installed version, as the reference's autograd does.
AT_BOUND: bool = _UTILS.clamp_grad_passes_at_bound()

_HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not _HAS_CUDA or INTERPRET, reason="needs a CUDA device (and no TRITON_INTERPRET)"),
        ],
    ),
]
DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16]
SIZES = [1, 1023, 4100]
EPS = 8 / 255


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=[(), (1,)], ids=["a0d", "a1"])
def step_shape(request) -> tuple[int, ...]:
    """Shape of the step sizes: 0-d (the trainer's; PyTorch casts it to the data's dtype before multiplying, so
    fp16/bf16 products round) or (1,) (takes part in type promotion: products in fp32)."""
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request, device) -> torch.dtype:
    if request.param == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16")
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Pixels in [0, 1] with some exactly 0 and 1."""
    x = torch.rand(n, generator=_gen(seed), dtype=torch.float64)
    x[::7] = 0.0
    x[3::7] = 1.0
    return x.to(dtype).to(device)


def _grad(n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """A gradient with exact zeros (sign 0) in it."""
    g = torch.randn(n, generator=_gen(seed), dtype=torch.float64)
    g[5::11] = 0.0
    return g.to(dtype).to(device)


def _assert_sum_close(got: torch.Tensor, terms: torch.Tensor, acc: torch.dtype) -> None:
    """``got`` is the kernel's sum of ``terms`` (the reference autograd's per-element gradient of ``a``).

    The kernel sums each block of BLOCK_SIZE terms with a tree (depth log2(BLOCK_SIZE)), then torch.sum adds
    the P = cdiv(n, BLOCK_SIZE) partials (depth <= P); one more rounding allows for a contracted (FMA) product.
    A sum whose every term passes through at most k roundings is within k*u*sum|terms| of the exact sum
    (Higham, Accuracy and Stability, 4.2), u the unit roundoff of the accumulation dtype; casting the sum to
    the result's dtype adds half an ulp of that dtype. When the per-element terms are narrower than the
    accumulation (fp64 data, fp32 ``a``: autograd casts each term to fp32), each carries one more rounding.
    """
    n = terms.numel()
    u = 2.0**-53 if acc == torch.float64 else 2.0**-24
    depth = math.log2(BLOCK_SIZE) + triton.cdiv(n, BLOCK_SIZE) + 1
    exact = terms.double().sum().item()
    if torch.finfo(terms.dtype).eps / 2 > u:
        depth += torch.finfo(terms.dtype).eps / 2 / u
    cast = torch.finfo(got.dtype).eps / 2 * abs(exact)
    bound = depth * u * terms.double().abs().sum().item() + cast + 1e-300
    assert got.numel() == 1
    assert abs(got.double().item() - exact) <= bound, (got.item(), exact, bound)


def _a(value: float, device: str, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (1,)) -> torch.Tensor:
    return torch.tensor([value], dtype=dtype, device=device).reshape(shape)


def _mask(status: str, device: str) -> torch.Tensor:
    """Where a clamp passes the gradient, per element: i(nside), b(ound, passes iff AT_BOUND), o(utside)."""
    return torch.tensor([c == "i" or (c == "b" and AT_BOUND) for c in status], dtype=torch.bool, device=device)


def test_bound_convention_matches_pytorch():
    for lo, hi, v in ((0.0, 1.0, 0.0), (0.0, 1.0, 1.0), (-EPS, EPS, EPS), (-EPS, EPS, -EPS)):
        t = torch.tensor([v], requires_grad=True)
        torch.clamp(t, lo, hi).backward(torch.ones(1))
        assert bool(t.grad[0] != 0) == AT_BOUND


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("a_shape", [(), (1,)], ids=["0d", "1elem"])
def test_step_kernels_launch_alike_on_every_device(dtype, a_shape):
    """perturb_init's and sign_step's clamp bound is rounded to the data's dtype wherever the clamped value is a
    tensor of that dtype (a 0-d step size with fp16/bf16 data), on CUDA as on the CPU: the forward clamp gives the
    same rounded result with either bound, and the backward masks compare in the tensor's dtype on both devices
    (autograd's ``gt``/``lt`` with a Python scalar: CUDA's compare kernels cast the scalar to the tensor's dtype,
    unlike CUDA's clamp kernel, which keeps it in fp32). So the launch constants cannot depend on the device;
    a ``meta`` tensor stands in for a CUDA one (same shape and dtype, not the CPU)."""
    a = torch.full(a_shape, 0.01)
    cpu = _UTILS.step_launch(torch.empty(4, dtype=dtype), a, dtype)
    other = _UTILS.step_launch(torch.empty(4, dtype=dtype, device="meta"), a, dtype)
    assert cpu == other
    assert ("ROUND_EPS" not in cpu[1]) or cpu[1]["ROUND_EPS"] == cpu[1]["ROUND_A"]


def _per_element(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``a`` repeated per element, as a leaf: its gradient holds the terms whose sum is ``dL/da``.

    A 0-d ``a`` is first cast to ``like``'s dtype, as PyTorch's type promotion does in ``a * like``, so the
    leaf's products round exactly as the reference's with the 0-d ``a`` itself (checked by the callers).
    """
    a = a.detach()
    if a.dim() == 0:
        a = a.to(torch.result_type(a, like))
    return a.expand(like.shape).clone().requires_grad_()


# ----------------------------------------------------------------------------------------------- perturb_init


def _omega(n: int, device: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.rand(n, generator=_gen(seed), dtype=torch.float64) * 2 - 1
    w[2::13] = 0.0
    return w.to(dtype).to(device)


def _ref_perturb_init(x, omega, a, eps, gx0, gd0):
    xr = x.clone().requires_grad_()
    af = _per_element(a, omega)
    x0, d0 = R.perturb_init(xr, omega, af, eps)
    outs, grads = [x0], [gx0]
    if gd0 is not None:
        outs.append(d0)
        grads.append(gd0)
    torch.autograd.backward(outs, grads)
    # the per-element leaf computes what the reference computes with ``a`` itself
    torch.testing.assert_close((x0, d0), R.perturb_init(x, omega, a, eps), rtol=0, atol=0)
    return x0.detach(), d0.detach(), xr.grad, af.grad


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("omega_like_x", [False, True], ids=["omega_f32", "omega_like_x"])
def test_perturb_init_fwd(device, dtype, n, step_shape, omega_like_x):
    omega = _omega(n, device, 1, dtype if omega_like_x else torch.float32)
    x, a = _image(n, dtype, device, 0), _a(0.05, device, shape=step_shape)  # |a*omega| up to 0.05 > eps
    x0, d0 = K.perturb_init_fwd(x, omega, a, EPS)
    rx0, rd0 = R.perturb_init(x, omega, a, EPS)
    assert x0.dtype == d0.dtype == dtype
    torch.testing.assert_close(x0, rx0, rtol=0, atol=0)
    torch.testing.assert_close(d0, rd0, rtol=0, atol=0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_grad_d", [True, False])
@pytest.mark.parametrize("omega_like_x", [False, True], ids=["omega_f32", "omega_like_x"])
def test_perturb_init_bwd(device, dtype, n, with_grad_d, step_shape, omega_like_x):
    omega = _omega(n, device, 3, dtype if omega_like_x else torch.float32)
    x, a = _image(n, dtype, device, 2), _a(0.05, device, shape=step_shape)
    gx0 = _grad(n, dtype, device, 4)
    gd0 = _grad(n, dtype, device, 5) if with_grad_d else None
    grad_x, grad_a = K.perturb_init_bwd(gx0, gd0, x, omega, a, EPS)
    *_, ref_gx, terms = _ref_perturb_init(x, omega, a, EPS, gx0, gd0)
    torch.testing.assert_close(grad_x, ref_gx, rtol=0, atol=0)
    assert grad_a.shape == a.shape and grad_a.dtype == a.dtype
    _assert_sum_close(grad_a, terms, torch.float32)


def test_perturb_init_bounds(device, dtype):
    """Elements exactly at +-eps and at 0/1 follow PyTorch's clamp convention, elements past them pass nothing."""
    eps = 1 / 32
    omega = torch.tensor([1, -1, 2, -2, 0, 0.5, 1, -1], dtype=torch.float32, device=device) / 32
    x = torch.tensor([31 / 32, 1 / 32, 0.5, 0.5, 0, 1, 0, 1], dtype=dtype, device=device)
    a = _a(1.0, device)
    gx0, gd0 = _grad(8, dtype, device, 6) + 3, _grad(8, dtype, device, 7)  # gx0 has no zero
    x0, d0 = K.perturb_init_fwd(x, omega, a, eps)
    grad_x, grad_a = K.perturb_init_bwd(gx0, gd0, x, omega, a, eps)
    rx0, rd0, ref_gx, terms = _ref_perturb_init(x, omega, a, eps, gx0, gd0)
    torch.testing.assert_close(x0, rx0, rtol=0, atol=0)
    torch.testing.assert_close(d0, rd0, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, ref_gx, rtol=0, atol=0)
    assert torch.equal(grad_x != 0, _mask("bbiiboii", device))
    m_eps0 = _mask("bbooiibb", device)
    assert torch.equal(terms[~m_eps0], torch.zeros_like(terms[~m_eps0]))
    _assert_sum_close(grad_a, terms, torch.float32)


# -------------------------------------------------------------------------------------------------- sign_step


def _delta(n: int, dtype: torch.dtype, device: str, seed: int, eps: float = EPS) -> torch.Tensor:
    d = (torch.rand(n, generator=_gen(seed), dtype=torch.float64) * 2 - 1) * eps
    d[1::9] = eps
    return d.to(dtype).to(device)


def _ref_sign_step(x, d, g, a, eps, gx1, gd1):
    xr, dr = x.clone().requires_grad_(), d.clone().requires_grad_()
    af = _per_element(a, d)
    x1, d1 = R.sign_step(xr, dr, g, af, eps)
    outs, grads = [x1], [gx1]
    if gd1 is not None:
        outs.append(d1)
        grads.append(gd1)
    torch.autograd.backward(outs, grads)
    # the per-element leaf computes what the reference computes with ``a`` itself
    torch.testing.assert_close((x1, d1), R.sign_step(x, d, g, a, eps), rtol=0, atol=0)
    return x1.detach(), d1.detach(), xr.grad, dr.grad, af.grad


@pytest.mark.parametrize("n", SIZES)
def test_sign_step_fwd(device, dtype, n, step_shape):
    x, d, g = _image(n, dtype, device, 10), _delta(n, dtype, device, 11), _grad(n, dtype, device, 12)
    a = _a(0.01, device, shape=step_shape)
    x1, d1 = K.sign_step_fwd(x, d, g, a, EPS)
    rx1, rd1 = R.sign_step(x, d, g, a, EPS)
    assert x1.dtype == d1.dtype == dtype
    torch.testing.assert_close(x1, rx1, rtol=0, atol=0)
    torch.testing.assert_close(d1, rd1, rtol=0, atol=0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_grad_d", [True, False])
def test_sign_step_bwd(device, dtype, n, with_grad_d, step_shape):
    x, d, g = _image(n, dtype, device, 13), _delta(n, dtype, device, 14), _grad(n, dtype, device, 15)
    a = _a(0.01, device, shape=step_shape)
    gx1 = _grad(n, dtype, device, 16)
    gd1 = _grad(n, dtype, device, 17) if with_grad_d else None
    grad_x, grad_d, grad_a = K.sign_step_bwd(gx1, gd1, x, d, g, a, EPS)
    *_, ref_gx, ref_gd, terms = _ref_sign_step(x, d, g, a, EPS, gx1, gd1)
    torch.testing.assert_close(grad_x, ref_gx, rtol=0, atol=0)
    torch.testing.assert_close(grad_d, ref_gd, rtol=0, atol=0)
    assert grad_a.shape == a.shape and grad_a.dtype == a.dtype
    _assert_sum_close(grad_a, terms, torch.float32)


def test_sign_step_bounds(device, dtype):
    """d + a*sign(g) at +-eps and x + d1 at 0/1 follow PyTorch's clamp convention; beyond them nothing passes."""
    eps, a = 1 / 32, _a(1 / 64, device)
    d = torch.tensor([1, -1, 2, 0, 1, -1, 2, -2], dtype=dtype, device=device) / 64
    g = torch.tensor([1, -1, 1, 0, 1, -1, -1, 1], dtype=dtype, device=device)
    x = torch.tensor([0.5, 0.5, 0.5, 0.5, 31 / 32, 1 / 32, 1, 0], dtype=dtype, device=device)
    gx1, gd1 = _grad(8, dtype, device, 18) + 3, _grad(8, dtype, device, 19) + 3
    x1, d1 = K.sign_step_fwd(x, d, g, a, eps)
    grad_x, grad_d, grad_a = K.sign_step_bwd(gx1, gd1, x, d, g, a, eps)
    rx1, rd1, ref_gx, ref_gd, terms = _ref_sign_step(x, d, g, a, eps, gx1, gd1)
    torch.testing.assert_close(x1, rx1, rtol=0, atol=0)
    torch.testing.assert_close(d1, rd1, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, ref_gx, rtol=0, atol=0)
    torch.testing.assert_close(grad_d, ref_gd, rtol=0, atol=0)
    assert torch.equal(grad_d != 0, _mask("bboibbii", device))
    assert torch.equal(grad_x != 0, _mask("iiiibboo", device))  # 1 + 1/64 and 0 - 1/64 are clamped
    _assert_sum_close(grad_a, terms, torch.float32)


@pytest.mark.parametrize("a_dtype", [torch.float64])
def test_step_sizes_in_float64(device, a_dtype, step_shape):
    """fp64 step sizes with fp32 data: the reference promotes a*omega and d + a*s to fp64 for a (1,) step size
    (and computes them in fp32 for a 0-d one), and so do the kernels."""
    n = 1023
    x, d, g = _image(n, torch.float32, device, 20), _delta(n, torch.float32, device, 21), _grad(n, torch.float32, device, 22)
    omega, a = _omega(n, device, 23), _a(0.05, device, a_dtype, step_shape)
    gx, gd = _grad(n, torch.float32, device, 24), _grad(n, torch.float32, device, 25)
    rx0, rd0, ref_gx, terms = _ref_perturb_init(x, omega, a, EPS, gx, gd)
    x0, d0 = K.perturb_init_fwd(x, omega, a, EPS)
    grad_x, grad_a = K.perturb_init_bwd(gx, gd, x, omega, a, EPS)
    torch.testing.assert_close((x0, d0, grad_x), (rx0, rd0, ref_gx), rtol=0, atol=0)
    assert grad_a.dtype == a_dtype and grad_a.shape == a.shape
    _assert_sum_close(grad_a, terms, torch.float64)
    rx1, rd1, ref_gx, ref_gd, terms = _ref_sign_step(x, d, g, a, EPS, gx, gd)
    x1, d1 = K.sign_step_fwd(x, d, g, a, EPS)
    grad_x, grad_d, grad_a = K.sign_step_bwd(gx, gd, x, d, g, a, EPS)
    torch.testing.assert_close((x1, d1, grad_x, grad_d), (rx1, rd1, ref_gx, ref_gd), rtol=0, atol=0)
    _assert_sum_close(grad_a, terms, torch.float64)


# ------------------------------------------------------------------------------------- pack_sign, layer_perturb


@pytest.mark.parametrize("n", SIZES)
def test_pack_sign(device, dtype, n):
    g = _grad(n, dtype, device, 30)
    if n > 4:
        g[:4] = torch.tensor([-0.0, 1e-30, -1e-30, 0.0], dtype=torch.float64).to(dtype)  # -0, underflow to 0 in fp16
    s = K.pack_sign(g)
    assert s.dtype == torch.int8 and s.shape == g.shape
    assert torch.equal(s, R.pack_sign(g))


@pytest.mark.parametrize("shape", [(1,), (1, 3, 11, 31), (2, 5, 410)])
def test_layer_perturb(device, dtype, shape, step_shape):
    n = math.prod(shape)
    h = _grad(n, dtype, device, 31).reshape(shape)
    s = R.pack_sign(_grad(n, dtype, device, 32)).reshape(shape)
    a = _a(0.0371, device, shape=step_shape)  # a 0-d a rounds a*s to h's dtype first: the same value, s is +-1 or 0
    torch.testing.assert_close(K.layer_perturb_fwd(h, s, a), R.layer_perturb(h, s, a), rtol=0, atol=0)
    grad_out = _grad(n, dtype, device, 33).reshape(shape)
    af = _per_element(a, h)
    R.layer_perturb(h, s, af).backward(grad_out)
    grad_a = K.layer_perturb_bwd(grad_out, s, dtype=a.dtype)
    assert grad_a.shape == (1,) and grad_a.dtype == a.dtype
    _assert_sum_close(grad_a, af.grad, torch.float64 if dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------------------------------- omega store


def _omega_case(device, store_dtype, batch, w, seed):
    g = _gen(seed)
    n_store, c, h, p = 9, 3, 5, 2
    store = (torch.rand(n_store, c, h + 2 * p, w + 2 * p, generator=g, dtype=torch.float64) * 2.2 - 1.1).clamp(-1, 1)
    index = torch.randint(0, n_store, (batch,), generator=g)
    if batch > 2:
        index[-1] = index[0]  # duplicated examples: the first occurrence wins
        index[-2] = index[1]
    crop = torch.randint(0, 2 * p + 1, (batch, 2), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    grad = torch.randn(batch, c, h, w, generator=g)
    grad[..., ::3] = 0.0
    tensors = store.to(store_dtype), index, crop, flip, grad.to(store_dtype)
    return tuple(t.to(device) for t in tensors) + (h, w)


@pytest.mark.parametrize("batch,w", [(1, 7), (6, 7), (5, 40)])
def test_omega_gather(device, dtype, batch, w):
    store, index, crop, flip, _, h, w = _omega_case(device, dtype, batch, w, 40 + batch)
    src = R.first_position(index)
    got = K.omega_gather(store, index, crop, flip, src, h, w)
    assert got.shape == (batch, store.shape[1], h, w) and got.dtype == dtype
    assert torch.equal(got, R.omega_gather(store, index, crop, flip, (h, w)))


@pytest.mark.parametrize("batch,w", [(1, 7), (6, 7), (5, 40)])
@pytest.mark.parametrize("ratio_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio_value", [0.25, 0.1])
def test_omega_update(device, dtype, batch, w, ratio_dtype, ratio_value, step_shape):
    store, index, crop, flip, grad, h, w = _omega_case(device, dtype, batch, w, 50 + batch)
    # 0.25 pushes stored values past +-1; 0.1 is not exact in fp16/bf16 (a 0-d ratio is rounded to the store's dtype)
    ratio = _a(ratio_value, device, ratio_dtype, step_shape)
    ref = store.clone()
    R.omega_update(ref, index, crop, flip, grad, ratio)
    K.omega_update(store, index, crop, flip, R.first_position(index), grad, ratio)
    assert torch.equal(store, ref)


# ---------------------------------------------------------------------------------------------------- pgd_step


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("binds", [False, True], ids=["random", "binds"])
def test_pgd_step(device, dtype, n, binds):
    """Exact against the reference on the same device: x -+ eps is formed with eps rounded to fp16/bf16 first on
    CPU tensors (PyTorch's CPU kernels) and in fp32 on CUDA tensors. ``binds``: x_adv = x and a step of 2 eps, so
    every moved element is projected onto x -+ eps."""
    x = _image(n, dtype, device, 60)
    x_adv = x.clone() if binds else (x + _delta(n, dtype, device, 61)).clamp(0, 1)
    g = _grad(n, dtype, device, 62)
    step = 2 * EPS if binds else 2 / 255
    got = K.pgd_step(x_adv, x, g, step, EPS)
    assert got.dtype == dtype
    torch.testing.assert_close(got, R.pgd_step(x_adv, x, g, step, EPS), rtol=0, atol=0)


def test_scalar_conventions_where_eps_binds(device, dtype, step_shape):
    """d + a*sign(g) and a_init*omega land exactly on eps rounded to the dtype, below eps itself: whether that
    element passes the gradient depends on the step size's shape and (for a 0-d one) on the device's rounding of
    eps; the kernels match the reference on their own device."""
    n, a_val = 64, 2.0**-6
    e_lo = torch.tensor(EPS, dtype=dtype).item()
    e_hi = torch.nextafter(torch.tensor(e_lo, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()
    eps = e_lo + (e_hi - e_lo) / 4  # rounds down to e_lo in the dtype
    d = torch.full((n,), e_lo - a_val, dtype=torch.float64)
    d[1::2] = e_lo
    d = d.to(dtype).to(device)
    g = torch.ones(n, dtype=dtype, device=device)
    g[1::2] = 0.0  # d + a*0 = e_lo
    x = torch.full((n,), 0.5, dtype=dtype, device=device)
    a = _a(a_val, device, shape=step_shape)
    gx, gd = _grad(n, dtype, device, 70) + 3, _grad(n, dtype, device, 71) + 3
    rx1, rd1, ref_gx, ref_gd, terms = _ref_sign_step(x, d, g, a, eps, gx, gd)
    x1, d1 = K.sign_step_fwd(x, d, g, a, eps)
    grad_x, grad_d, grad_a = K.sign_step_bwd(gx, gd, x, d, g, a, eps)
    torch.testing.assert_close((x1, d1, grad_x, grad_d), (rx1, rd1, ref_gx, ref_gd), rtol=0, atol=0)
    _assert_sum_close(grad_a, terms, torch.float32)
    omega = (d.double() * 2).to(dtype)
    ai = _a(0.5, device, shape=step_shape)
    rx0, rd0, ref_gx, terms = _ref_perturb_init(x, omega, ai, eps, gx, gd)
    x0, d0 = K.perturb_init_fwd(x, omega, ai, eps)
    grad_x, grad_a = K.perturb_init_bwd(gx, gd, x, omega, ai, eps)
    torch.testing.assert_close((x0, d0, grad_x), (rx0, rd0, ref_gx), rtol=0, atol=0)
    _assert_sum_close(grad_a, terms, torch.float32)


# ----------------------------------------------------------------------------------------------- memory layout


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def test_channels_last_matches_nchw(device, dtype):
    """Every kernel takes channels_last tensors as they are: same values as NCHW, outputs channels_last."""
    shape, n = (2, 3, 5, 7), 210
    x, d, g = (t.reshape(shape) for t in (_image(n, dtype, device, 80), _delta(n, dtype, device, 81),
                                          _grad(n, dtype, device, 82)))
    omega, go = _omega(n, device, 83, dtype).reshape(shape), _grad(n, dtype, device, 84).reshape(shape)
    a = _a(0.01, device, shape=())
    s = R.pack_sign(g)
    calls = [
        lambda x, d, g, o, go, s: K.perturb_init_fwd(x, o, a, EPS),
        lambda x, d, g, o, go, s: K.perturb_init_bwd(go, go, x, o, a, EPS),
        lambda x, d, g, o, go, s: K.sign_step_fwd(x, d, g, a, EPS),
        lambda x, d, g, o, go, s: K.sign_step_bwd(go, None, x, d, g, a, EPS),
        lambda x, d, g, o, go, s: (K.pack_sign(g),),
        lambda x, d, g, o, go, s: (K.layer_perturb_fwd(x, s, a), K.layer_perturb_bwd(go, s)),
        lambda x, d, g, o, go, s: (K.pgd_step(x, x, g, 2 * EPS, EPS),),
    ]
    for call in calls:
        want = call(x, d, g, omega, go, s)
        got = call(*(_cl(t) for t in (x, d, g, omega, go, s)))
        for u, v in zip(got, want):
            if u.dim() == 4:
                assert u.is_contiguous(memory_format=torch.channels_last) and not u.is_contiguous()
                torch.testing.assert_close(u, v, rtol=0, atol=0)
            else:  # a step-size gradient: the same terms summed in another order
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_omega_channels_last(device, dtype):
    """A channels_last store gathers channels_last windows; the update reads g and writes the store by strides."""
    store, index, crop, flip, grad, h, w = _omega_case(device, dtype, 6, 7, 90)
    src = R.first_position(index)
    got = K.omega_gather(_cl(store), index, crop, flip, src, h, w)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert torch.equal(got, R.omega_gather(store, index, crop, flip, (h, w)))
    ratio = _a(0.1, device, shape=())
    ref, cl = store.clone(), _cl(store)
    R.omega_update(ref, index, crop, flip, grad, ratio)
    K.omega_update(cl, index, crop, flip, src, _cl(grad), ratio)
    assert torch.equal(cl, ref)
    K.omega_update(store, index, crop, flip, src, grad.transpose(2, 3).contiguous().transpose(2, 3), ratio)
    assert torch.equal(store, ref)


def test_layouts_the_kernels_cannot_run_are_refused(device):
    """A strided view, or tensors of one op in different layouts, raise a one-line error instead of garbage."""
    x, d, g = (t.reshape(2, 3, 4, 6) for t in (_image(144, torch.float32, device, 95),
                                               _delta(144, torch.float32, device, 96), _grad(144, torch.float32, device, 97)))
    a = _a(0.01, device)
    with pytest.raises(ValueError, match=r"sign_step_fwd: x with strides .* is not dense; pass x.contiguous\(\)"):
        K.sign_step_fwd(x[..., ::2], d[..., ::2], g[..., ::2], a, EPS)
    with pytest.raises(ValueError, match=r"sign_step_fwd: g has shape .* and strides .* pass g in x's memory format"):
        K.sign_step_fwd(x, d, _cl(g), a, EPS)
    with pytest.raises(ValueError, match=r"pgd_step: x has shape"):
        K.pgd_step(x, x.transpose(2, 3).contiguous().transpose(2, 3), g, 0.01, EPS)
    with pytest.raises(ValueError, match=r"layer_perturb_fwd: s has shape"):
        K.layer_perturb_fwd(x, R.pack_sign(_cl(g)), a)
    with pytest.raises(ValueError, match=r"pack_sign: g with strides .* is not dense"):
        K.pack_sign(g[:, :, ::2])
    with pytest.raises(ValueError, match=r"omega_update: store must be a dense"):
        K.omega_update(torch.zeros(4, 3, 8, 10, device=device)[..., ::2], torch.zeros(1, dtype=torch.long, device=device),
                       torch.zeros(1, 2, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.bool, device=device),
                       torch.zeros(1, dtype=torch.long, device=device), torch.ones(1, 3, 4, 5, device=device), a)


# ---------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _HAS_CUDA or INTERPRET, reason="needs a CUDA device (and ~7 GB of its memory)")
def test_int64_offsets_cuda():
    """Offsets past 2^31 elements: the program id is widened to int64 before it is multiplied."""
    n = 2**31 + 3 * BLOCK_SIZE + 5
    g = torch.ones(n, dtype=torch.float16, device="cuda")
    g[-5:] = torch.tensor([-1.0, 0.0, 2.0, -3.0, 0.5], device="cuda")
    s = K.pack_sign(g)
    assert s[-5:].tolist() == [-1, 0, 1, -1, 1]
    assert int(s[: 2**31].sum(dtype=torch.int64)) == 2**31


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA or INTERPRET or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and compute the reference."""
    dev = torch.device("cuda", 1)
    x, d, g = _image(4100, torch.float32, dev, 98), _delta(4100, torch.float32, dev, 99), _grad(4100, torch.float32, dev, 100)
    a = _a(0.01, dev)
    with torch.cuda.device(0):
        x1, d1 = K.sign_step_fwd(x, d, g, a, EPS)
        s = K.pack_sign(g)
        new = K.pgd_step(x, x, g, 2 * EPS, EPS)
    assert x1.device == dev
    torch.testing.assert_close((x1, d1), R.sign_step(x, d, g, a, EPS), rtol=0, atol=0)
    assert torch.equal(s, R.pack_sign(g))
    assert torch.equal(new, R.pgd_step(x, x, g, 2 * EPS, EPS))
