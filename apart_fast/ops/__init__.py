"""Fused APART perturbation ops. Every op takes ``backend="auto"|"torch"|"cpp"|"cuda"|"triton"`` last.

``"auto"`` runs CUDA tensors on the CUDA extension if built, else Triton if importable, else the
PyTorch reference, and CPU tensors on the C++ extension if built, else the reference; the
environment variable ``APART_FAST_BACKEND`` overrides it (see ``dispatch.py``; ``python -m
apart_fast.info`` reports what is available). ``"torch"`` is the reference itself (``reference.py``)
with PyTorch autograd. The fused backends keep the memory format: dense inputs that share one (NCHW,
channels_last, ...) reach the kernels as they are and the outputs have it too; a strided view, or an
argument laid out unlike the op's first tensor, is copied once into that layout (``dispatch.shared_layout``).

The compiled backends are also registered as ``torch.library`` custom ops (``torch.ops.apart_fast.*``,
see ``functions.py``): under ``torch.compile`` (and ``torch.export``) these functions call them, so a
compiled graph keeps each fused op as one node, with its fake (shape) kernel and registered autograd;
in eager mode they call the same kernels through ``autograd.Function``s, without a dispatcher round trip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from apart_fast.ops import dispatch as _dispatch
from apart_fast.ops import functions as _fn
from apart_fast.ops import reference
from apart_fast.ops.functions import LayerPerturb, PerturbInit, SignStep


def _compiling() -> bool:
    """Whether torch.compile / torch.export is tracing this call (then the custom ops are used)."""
    return torch.compiler.is_compiling()


def perturb_init(x: Tensor, omega: Tensor, a_init: Tensor, eps: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """APART initialisation ``(x0, d0)``: ``d0 = clamp(a_init*omega, -eps, eps)``, ``x0 = clamp(x + d0, 0, 1)``.

    Differentiable in ``x`` and ``a_init`` (a one-element fp32/fp64 tensor); ``omega`` is data.
    """
    name = _dispatch.resolve(backend, x.device)
    _dispatch.check_data("perturb_init", name, x=x, omega=omega)
    _dispatch.check_step("perturb_init", "a_init", a_init, x)
    eps = _dispatch.check_eps("perturb_init", eps)
    if name == "torch":
        return reference.perturb_init(x, omega, a_init, eps)
    if _compiling():
        return _fn.perturb_init_op(x, omega, a_init, eps, name)
    return PerturbInit.apply(*_dispatch.shared_layout(x, omega), a_init, eps, name)


def sign_step(x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One learnable sign step ``(x1, d1)``: ``d1 = clamp(d + a*sign(g), -eps, eps)``, ``x1 = clamp(x + d1, 0, 1)``.

    Differentiable in ``x``, ``d`` and ``a``; ``g`` (the pass-1 input gradient) is data.
    """
    name = _dispatch.resolve(backend, x.device)
    _dispatch.check_data("sign_step", name, x=x, d=d, g=g)
    _dispatch.check_step("sign_step", "a", a, x)
    eps = _dispatch.check_eps("sign_step", eps)
    if name == "torch":
        return reference.sign_step(x, d, g, a, eps)
    if _compiling():
        return _fn.sign_step_op(x, d, g.detach(), a, eps, name)
    x, d, g = _dispatch.shared_layout(x, d, g.detach())
    return SignStep.apply(x, d, g, a, eps, name)


def pack_sign(g: Tensor, backend: str = "auto") -> Tensor:
    """``sign(g)`` as int8 (-1, 0, 1) in g's memory format: a quarter of an fp32 gradient's memory. Not differentiable."""
    name = _dispatch.resolve(backend, g.device)
    _dispatch.check_data("pack_sign", name, g=g)
    with torch.no_grad():
        if name == "torch":
            return reference.pack_sign(g)
        if _compiling():
            return _fn.pack_sign_op(g, name)
        return _dispatch.module(name).pack_sign(_dispatch.dense(g))


def layer_perturb(h: Tensor, s: Tensor, a: Tensor, backend: str = "auto") -> Tensor:
    """Layer-wise perturbation ``h + a*s`` (``s`` from ``pack_sign``); differentiable in ``h`` and ``a``."""
    name = _dispatch.resolve(backend, h.device)
    _dispatch.check_data("layer_perturb", name, h=h)
    if not isinstance(s, Tensor) or s.dtype != torch.int8:
        raise TypeError(f"layer_perturb: s must be the int8 tensor from pack_sign, got {getattr(s, 'dtype', type(s))}")
    if s.device != h.device or s.shape != h.shape:
        raise ValueError(f"layer_perturb: s is {tuple(s.shape)} on {s.device} but h is {tuple(h.shape)} on {h.device}; "
                         "pass the sign of this site's pass-1 gradient")
    _dispatch.check_step("layer_perturb", "a", a, h)
    if name == "torch":
        return reference.layer_perturb(h, s, a)
    if _compiling():
        return _fn.layer_perturb_op(h, s, a, name)
    return LayerPerturb.apply(*_dispatch.shared_layout(h, s), a, name)


def _check_store(op: str, store: Tensor) -> None:
    if store.dim() == 4 and not _dispatch.is_dense(store):
        raise ValueError(f"{op}: store with strides {store.stride()} is not dense (it is read and written in place "
                         "through its strides); allocate it dense, in any memory format")


def _window_args(op: str, store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, batch: int | None = None):
    """Checked (index, crop, flip) as contiguous int64/int64/bool tensors on the store's device."""
    if store.dim() != 4:
        raise ValueError(f"{op}: store must be (N, C, H+2p, W+2p), got shape {tuple(store.shape)}")
    b = index.shape[0] if index.dim() == 1 else -1
    if index.dim() != 1 or crop.shape != (b, 2) or flip.shape != (b,):
        raise ValueError(f"{op}: index must be (B,), crop (B, 2), flip (B,); got {tuple(index.shape)}, "
                         f"{tuple(crop.shape)}, {tuple(flip.shape)}")
    if batch is not None and batch != b:
        raise ValueError(f"{op}: g has batch {batch} but index has {b} entries; pass one index per example")
    for name, t in (("index", index), ("crop", crop), ("flip", flip)):
        if t.device != store.device:
            raise ValueError(f"{op}: {name} is on {t.device} but store is on {store.device}; move {name} there")
        if t.is_floating_point():
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; pass integer (flip: bool) tensors")
    return (index.to(torch.int64).contiguous(), crop.to(torch.int64).contiguous(),
            flip.to(torch.bool).contiguous())


def omega_gather(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, size: tuple[int, int],
                 backend: str = "auto") -> Tensor:
    """Each example's initialisation ``(B, C, H, W)``: its store row cropped at ``crop`` (dy, dx), then flipped.

    The output has the store's memory format (allocate the store channels_last for channels_last batches).
    No autograd; no host sync on CUDA (window bounds are trusted there; the CPU backend checks them).
    """
    name = _dispatch.resolve(backend, store.device)
    _dispatch.check_data("omega_gather", name, store=store)
    _check_store("omega_gather", store)
    index, crop, flip = _window_args("omega_gather", store, index, crop, flip)
    h, w = int(size[0]), int(size[1])
    with torch.no_grad():
        if name == "torch":
            return reference.omega_gather(store, index, crop, flip, (h, w))
        src = reference.first_position(index)
        if _compiling():
            return _fn.omega_gather_op(store, index, crop, flip, src, h, w, name)
        return _dispatch.module(name).omega_gather(store, index, crop, flip, src, h, w)


def omega_update(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, g: Tensor, ratio: Tensor | float,
                 backend: str = "auto") -> None:
    """In place: ``omega <- clamp(omega + ratio*sign(g), -1, 1)`` written back through each example's crop and flip.

    An example present several times in the batch is updated once, from its first occurrence.
    ``store`` must be dense (it is written in place), in any memory format; ``g`` may have any strides.
    ``ratio``: a one-element tensor (graph-safe) or a Python float (copied to the device as a 0-d tensor,
    which rounds in fp16/bf16 as the reference's Python scalar does).
    """
    name = _dispatch.resolve(backend, store.device)
    _dispatch.check_data("omega_update", name, store=store)
    _check_store("omega_update", store)
    if g.dim() != 4 or g.shape[1] != store.shape[1] or g.shape[2] > store.shape[2] or g.shape[3] > store.shape[3]:
        raise ValueError(f"omega_update: g must be (B, {store.shape[1]}, H, W) with H, W within the store's frame "
                         f"{tuple(store.shape[2:])}, got shape {tuple(g.shape)}")
    if g.device != store.device:
        raise ValueError(f"omega_update: g is on {g.device} but store is on {store.device}; move g there")
    if g.dtype != store.dtype:
        raise TypeError(f"omega_update: g has dtype {g.dtype} but store has {store.dtype}; cast it with g.to(store.dtype)")
    index, crop, flip = _window_args("omega_update", store, index, crop, flip, batch=g.shape[0])
    if isinstance(ratio, Tensor):
        _dispatch.check_step("omega_update", "ratio", ratio, store)
    elif not isinstance(ratio, (int, float)):
        raise TypeError(f"omega_update: ratio must be a one-element tensor or a float, got {type(ratio).__name__}")
    with torch.no_grad():
        if name == "torch":
            reference.omega_update(store, index, crop, flip, g, ratio)
            return
        if not isinstance(ratio, Tensor):
            acc = torch.float64 if store.dtype == torch.float64 else torch.float32
            ratio = torch.tensor(float(ratio), dtype=acc, device=store.device)
        src = reference.first_position(index)
        if _compiling():
            _fn.omega_update_op(store, index, crop, flip, src, g, ratio, name)
            return
        _dispatch.module(name).omega_update(store, index, crop, flip, src, g, ratio.contiguous())


def pgd_step(x_adv: Tensor, x: Tensor, g: Tensor, step: float, eps: float, backend: str = "auto") -> Tensor:
    """One PGD step: ``x_adv + step*sign(g)`` projected onto the eps-ball around ``x`` and [0, 1]. No autograd."""
    name = _dispatch.resolve(backend, x.device)
    _dispatch.check_data("pgd_step", name, x=x, x_adv=x_adv, g=g)
    eps = _dispatch.check_eps("pgd_step", eps)
    if isinstance(step, Tensor) or not isinstance(step, (int, float)):
        raise TypeError(f"pgd_step: step must be a Python float, got {type(step).__name__}")
    with torch.no_grad():
        if name == "torch":
            return reference.pgd_step(x_adv, x, g, float(step), eps)
        if _compiling():
            return _fn.pgd_step_op(x_adv, x, g, float(step), eps, name)
        return _dispatch.module(name).pgd_step(*_dispatch.shared_layout(x_adv, x, g), float(step), eps)


__all__ = [
    "layer_perturb",
    "omega_gather",
    "omega_update",
    "pack_sign",
    "perturb_init",
    "pgd_step",
    "reference",
    "sign_step",
]
