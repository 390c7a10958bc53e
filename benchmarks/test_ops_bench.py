"""Op benchmarks: fused backend vs eager reference vs torch.compile(reference), with achieved bandwidth.

Run: ``.venv/bin/python -m pytest benchmarks/ --benchmark-only -q`` (``-k "not 16M"`` skips the large size;
``-k 2x3x8x8`` is the tiny size the GPU suite's CPU dry run uses). Each op is timed call by call over many
back-to-back calls (``conftest.time_calls``: CUDA events on a GPU), and so is the ``copy`` baseline; its
``extra_info`` records those times (``time_s``), the bytes the op must move (its inputs read and outputs
written once), the achieved GB/s at the median, that as a fraction of the session's copy bandwidth, and
the versions. Providers: ``fused`` (the extension for the device: cpp on CPU, cuda on GPU), ``triton``
(GPU only, when importable), ``eager`` (reference.py; ``Tensor.copy_`` for ``copy``), ``compile``
(``torch.compile`` of reference.py; skipped when compilation fails).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from apart_fast import ops
from apart_fast.ops import dispatch
from apart_fast.ops import reference as R

SIZES = {"2x3x8x8": (2, 3, 8, 8), "128x3x32x32": (128, 3, 32, 32), "128x64x32x32": (128, 64, 32, 32),
         "16M": (128, 128, 32, 32)}
EPS = 8 / 255
_COMPILED: dict[str, Callable] = {}


def _providers() -> list[str]:
    return ["fused", "triton", "eager", "compile"]


def _backend_for(provider: str, device: torch.device) -> str | None:
    if provider == "fused":
        name = "cuda" if device.type == "cuda" else "cpp"
        return name if dispatch.available(name) else None
    if provider == "triton":
        return "triton" if device.type == "cuda" and dispatch.available("triton") else None
    return None


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _case(op: str, shape, device: torch.device, backend: str | None, provider: str):
    """(callable to time, bytes it must move) for one op/provider."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    d = ((torch.rand(shape, generator=g) * 2 - 1) * EPS).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    es, n = x.element_size(), x.numel()
    a = torch.tensor(0.01, device=device)

    def pick(ref_fn: Callable, name: str) -> Callable:
        if backend is not None:
            return lambda *t: getattr(ops, name)(*t, backend=backend)
        return _compiled(name, ref_fn) if provider == "compile" else ref_fn

    if op in ("perturb_init", "sign_step"):
        fn = pick(getattr(R, op), op)
        args = (x, d) if op == "perturb_init" else (x, d, grad)

        def fwd():
            return fn(*args, a, EPS)

        return fwd, (4 if op == "perturb_init" else 5) * n * es
    if op in ("perturb_init+bwd", "sign_step+bwd"):
        base = op.split("+")[0]
        fn = pick(getattr(R, base), base)
        xl, al = x.clone().requires_grad_(), a.clone().requires_grad_()
        args = (xl, d) if base == "perturb_init" else (xl, d.clone().requires_grad_(), grad)
        leaves = [xl, al] if base == "perturb_init" else [xl, args[1], al]

        def full():
            out = fn(*args, al, EPS)
            return torch.autograd.grad(out, leaves, [grad, grad])

        # fwd (4N or 5N) + bwd: read grad_x, grad_d, the inputs; write the input gradients
        return full, (4 + 5) * n * es if base == "perturb_init" else (5 + 7) * n * es
    if op == "copy":
        dst = torch.empty_like(x)
        return (lambda: dst.copy_(x)), 2 * n * es
    if op == "pack_sign":
        fn = pick(R.pack_sign, "pack_sign")
        return (lambda: fn(grad)), n * (es + 1)
    if op in ("layer_perturb", "layer_perturb+bwd"):
        fn = pick(R.layer_perturb, "layer_perturb")
        s = R.pack_sign(grad)
        if op == "layer_perturb":
            return (lambda: fn(x, s, a)), n * (2 * es + 1)
        hl, al = x.clone().requires_grad_(), a.clone().requires_grad_()
        # fwd reads h, s and writes out; bwd reads grad_out and s (dL/dh is grad_out itself)
        return (lambda: torch.autograd.grad(fn(hl, s, al), [hl, al], grad)), n * (3 * es + 2)
    if op == "pgd_step":
        fn = pick(R.pgd_step, "pgd_step")
        x_adv = (x + d).clamp(0, 1)
        return (lambda: fn(x_adv, x, grad, 2 / 255, EPS)), 4 * n * es
    b, c, h, w = shape
    store = torch.rand(2 * b, c, h + 8, w + 8, generator=g).to(device)
    index = torch.randperm(2 * b, generator=g)[:b].to(device)
    crop = torch.randint(9, (b, 2), generator=g).to(device)
    flip = (torch.rand(b, generator=g) < 0.5).to(device)
    if op == "omega_gather":
        fn = pick(R.omega_gather, "omega_gather")
        return (lambda: fn(store, index, crop, flip, (h, w))), 2 * n * es
    fn = pick(R.omega_update, "omega_update")
    ratio = torch.tensor(0.5, device=device)
    return (lambda: fn(store, index, crop, flip, grad, ratio)), 3 * n * es


OPS = ["copy", "perturb_init", "perturb_init+bwd", "sign_step", "sign_step+bwd", "pack_sign", "layer_perturb",
       "layer_perturb+bwd", "pgd_step", "omega_gather", "omega_update"]


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op: str, size: str, provider: str, device, copy_gbps: float, timer, versions) -> None:
    if op == "copy" and provider != "eager":
        pytest.skip("the copy baseline is Tensor.copy_ only")
    backend = _backend_for(provider, device)
    if provider in ("fused", "triton") and backend is None:
        pytest.skip(f"{provider} backend unavailable on {device}")
    fn, nbytes = _case(op, SIZES[size], device, backend, provider)
    try:
        fn()  # warm-up (and compilation)
    except Exception as err:
        if provider == "compile":
            pytest.skip(f"torch.compile of the reference failed: {type(err).__name__}: {str(err)[:120]}")
        raise
    times = timer(fn)
    gbps = nbytes / times["median"] / 1e9
    benchmark.group = f"{op} {size}"
    benchmark.extra_info.update(versions)
    benchmark.extra_info.update({"time_s": times, "bytes": nbytes, "GB/s": round(gbps, 2), "copy_GB/s": round(copy_gbps, 2),
                                 "fraction_of_copy": round(gbps / copy_gbps, 3), "backend": backend or provider})
    # pytest-benchmark keeps the record; its own timing (one synchronised call) is superseded by ``time_s``
    benchmark.pedantic(fn, rounds=1, iterations=1)
