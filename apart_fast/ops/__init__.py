"""Fused perturbation ops. Every op takes ``backend="auto"|"torch"|"triton"|"cuda"|"cpp"``.

Placeholder dispatch: only the reference exists until the kernel backends land.
"""

from __future__ import annotations

from apart_fast.ops import reference as _ref


def _check(backend: str) -> None:
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend {backend!r} is not built yet; use backend='torch' or 'auto'")


def perturb_init(x, omega, a_init, eps, backend="auto"):
    _check(backend)
    return _ref.perturb_init(x, omega, a_init, eps)


def sign_step(x, d, g, a, eps, backend="auto"):
    _check(backend)
    return _ref.sign_step(x, d, g, a, eps)


def pack_sign(g, backend="auto"):
    _check(backend)
    return _ref.pack_sign(g)


def layer_perturb(h, s, a, backend="auto"):
    _check(backend)
    return _ref.layer_perturb(h, s, a)


def omega_gather(store, index, crop, flip, size, backend="auto"):
    _check(backend)
    return _ref.omega_gather(store, index, crop, flip, size)


def omega_update(store, index, crop, flip, g, ratio, backend="auto"):
    _check(backend)
    return _ref.omega_update(store, index, crop, flip, g, ratio)


def pgd_step(x_adv, x, g, step, eps, backend="auto"):
    _check(backend)
    return _ref.pgd_step(x_adv, x, g, step, eps)
