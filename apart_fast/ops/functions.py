"""Autograd and ``torch.library`` registration of the ops over a backend's raw primitives (``dispatch.PRIMITIVES``).

Two entry points share one forward/backward definition:

- eager: the ``autograd.Function`` classes (``PerturbInit``, ``SignStep``, ``LayerPerturb``) call the
  backend module's primitives directly (no dispatcher round trip per call);
- ``torch.compile`` / ``torch.export``: the custom ops ``torch.ops.apart_fast.*`` (``torch.library.custom_op``
  with ``register_fake`` for shape propagation and ``register_autograd`` whose backward is itself a
  custom op), which the compiler keeps as opaque nodes. ``apart_fast.ops`` picks them while compiling.

The backend is a ``str`` argument of each custom op (``"cpp"``, ``"cuda"``, ``"triton"`` or ``"auto"``);
the reference (``"torch"``) is plain PyTorch and never goes through them. Each op saves only its
inputs (``layer_perturb`` only the int8 sign) and recomputes masks in backward; backward is not itself
differentiable. Tensors reach the kernels in one shared dense layout (``dispatch.shared_layout``: the memory
format of the op's first tensor, channels_last included; outputs and fake kernels use ``empty_like``, so a
compiled graph sees the same strides). Nothing syncs with the host, so the ops can be captured in a CUDA graph. Step-size
gradients come back from the backend as one-element fp32 (fp64) sums and are cast to the step size's
dtype and shape here. Requires torch >= 2.4 (``torch.library.custom_op``), which setup.py pins.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from apart_fast.ops import dispatch as _dispatch

NAMESPACE = "apart_fast"


def _as_step(a: Tensor) -> Tensor:
    """A one-element step size, contiguous and with its shape kept: in fp16/bf16 the reference rounds a
    0-d step size to the data dtype (type promotion) but computes with a (1,)-shaped one in fp32, and
    the kernels follow whichever they are given."""
    return a.contiguous()


def _like_step(grad: Tensor, a: Tensor) -> Tensor:
    return grad.to(a.dtype).reshape(a.shape)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _impl(backend: str, like: Tensor) -> ModuleType:
    """The primitive module for a custom op's ``backend`` argument (``"auto"`` resolved for ``like``'s device)."""
    name = _dispatch.resolve(backend, like.device)
    if name == "torch":
        raise RuntimeError(f"torch.ops.{NAMESPACE}: backend {backend!r} resolves to the reference, which has no "
                           "custom op; call apart_fast.ops.<op>(..., backend='torch') instead")
    return _dispatch.module(name)


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """What a kernel allocates for an output like ``like``: ``empty_like`` of its dense layout."""
    return torch.empty_like(like, dtype=dtype or like.dtype)


_layout = _dispatch.shared_layout


def _grad_like(ref: Tensor, grad: Tensor | None) -> Tensor | None:
    return None if grad is None else _dispatch.like(ref, grad)


def _store_format(store: Tensor) -> torch.memory_format:
    """The memory format of omega_gather's output: the store's (channels_last or contiguous)."""
    cl = store.is_contiguous(memory_format=torch.channels_last) and not store.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


# ---- forward and backward custom ops (opaque to the compiler; fake kernels give shapes) ----

@torch.library.custom_op(f"{NAMESPACE}::perturb_init", mutates_args=(),
                         schema="(Tensor x, Tensor omega, Tensor a_init, float eps, str backend) -> (Tensor, Tensor)")
def perturb_init_op(x: Tensor, omega: Tensor, a_init: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """``(x0, d0)`` of ``apart_fast.ops.perturb_init`` on a compiled backend."""
    return _impl(backend, x).perturb_init_fwd(*_layout(x, omega), _as_step(a_init), eps)


@perturb_init_op.register_fake
def _(x: Tensor, omega: Tensor, a_init: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return _empty(x), _empty(x)


@torch.library.custom_op(f"{NAMESPACE}::perturb_init_bwd", mutates_args=(),
                         schema="(Tensor grad_x0, Tensor? grad_d0, Tensor x, Tensor omega, Tensor a_init, float eps, "
                                "str backend) -> (Tensor, Tensor)")
def perturb_init_bwd_op(grad_x0: Tensor, grad_d0: Tensor | None, x: Tensor, omega: Tensor, a_init: Tensor, eps: float,
                        backend: str) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/da_init)`` with dL/da_init a (1,) fp32 (fp64) sum."""
    x, omega = _layout(x, omega)
    return _impl(backend, x).perturb_init_bwd(_grad_like(x, grad_x0), _grad_like(x, grad_d0), x, omega,
                                              _as_step(a_init), eps)


@perturb_init_bwd_op.register_fake
def _(grad_x0: Tensor, grad_d0: Tensor | None, x: Tensor, omega: Tensor, a_init: Tensor, eps: float,
      backend: str) -> tuple[Tensor, Tensor]:
    return _empty(x), x.new_empty((1,), dtype=_acc_dtype(x))


@torch.library.custom_op(f"{NAMESPACE}::sign_step", mutates_args=(),
                         schema="(Tensor x, Tensor d, Tensor g, Tensor a, float eps, str backend) -> (Tensor, Tensor)")
def sign_step_op(x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """``(x1, d1)`` of ``apart_fast.ops.sign_step`` on a compiled backend."""
    return _impl(backend, x).sign_step_fwd(*_layout(x, d, g), _as_step(a), eps)


@sign_step_op.register_fake
def _(x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return _empty(x), _empty(x)


@torch.library.custom_op(f"{NAMESPACE}::sign_step_bwd", mutates_args=(),
                         schema="(Tensor grad_x1, Tensor? grad_d1, Tensor x, Tensor d, Tensor g, Tensor a, float eps, "
                                "str backend) -> (Tensor, Tensor, Tensor)")
def sign_step_bwd_op(grad_x1: Tensor, grad_d1: Tensor | None, x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dL/dx, dL/dd, dL/da)`` with dL/da a (1,) fp32 (fp64) sum."""
    x, d, g = _layout(x, d, g)
    return _impl(backend, x).sign_step_bwd(_grad_like(x, grad_x1), _grad_like(x, grad_d1), x, d, g, _as_step(a), eps)


@sign_step_bwd_op.register_fake
def _(grad_x1: Tensor, grad_d1: Tensor | None, x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float,
      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _empty(x), _empty(x), x.new_empty((1,), dtype=_acc_dtype(x))


@torch.library.custom_op(f"{NAMESPACE}::layer_perturb", mutates_args=(),
                         schema="(Tensor h, Tensor s, Tensor a, str backend) -> Tensor")
def layer_perturb_op(h: Tensor, s: Tensor, a: Tensor, backend: str) -> Tensor:
    """``h + a*s`` of ``apart_fast.ops.layer_perturb`` on a compiled backend."""
    return _impl(backend, h).layer_perturb_fwd(*_layout(h, s), _as_step(a))


@layer_perturb_op.register_fake
def _(h: Tensor, s: Tensor, a: Tensor, backend: str) -> Tensor:
    return _empty(h)


@torch.library.custom_op(f"{NAMESPACE}::layer_perturb_bwd", mutates_args=(),
                         schema="(Tensor grad_out, Tensor s, str backend) -> Tensor")
def layer_perturb_bwd_op(grad_out: Tensor, s: Tensor, backend: str) -> Tensor:
    """``dL/da = sum(dL/dout * s)`` as a (1,) fp32 (fp64) tensor."""
    return _impl(backend, grad_out).layer_perturb_bwd(*_layout(grad_out, s))


@layer_perturb_bwd_op.register_fake
def _(grad_out: Tensor, s: Tensor, backend: str) -> Tensor:
    return grad_out.new_empty((1,), dtype=_acc_dtype(grad_out))


@torch.library.custom_op(f"{NAMESPACE}::pack_sign", mutates_args=(), schema="(Tensor g, str backend) -> Tensor")
def pack_sign_op(g: Tensor, backend: str) -> Tensor:
    """``sign(g)`` as int8; not differentiable."""
    return _impl(backend, g).pack_sign(_dispatch.dense(g))


@pack_sign_op.register_fake
def _(g: Tensor, backend: str) -> Tensor:
    return _empty(g, torch.int8)


@torch.library.custom_op(f"{NAMESPACE}::pgd_step", mutates_args=(),
                         schema="(Tensor x_adv, Tensor x, Tensor g, float step, float eps, str backend) -> Tensor")
def pgd_step_op(x_adv: Tensor, x: Tensor, g: Tensor, step: float, eps: float, backend: str) -> Tensor:
    """One PGD step; not differentiable."""
    return _impl(backend, x).pgd_step(*_layout(x_adv, x, g), step, eps)


@pgd_step_op.register_fake
def _(x_adv: Tensor, x: Tensor, g: Tensor, step: float, eps: float, backend: str) -> Tensor:
    return _empty(x_adv)


@torch.library.custom_op(f"{NAMESPACE}::omega_gather", mutates_args=(),
                         schema="(Tensor store, Tensor index, Tensor crop, Tensor flip, Tensor src, int h, int w, "
                                "str backend) -> Tensor")
def omega_gather_op(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, src: Tensor, h: int, w: int,
                    backend: str) -> Tensor:
    """Each example's (C, h, w) window of the store, flipped where asked; not differentiable."""
    return _impl(backend, store).omega_gather(store, index, crop, flip, src, h, w)


@omega_gather_op.register_fake
def _(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, src: Tensor, h: int, w: int, backend: str) -> Tensor:
    return torch.empty((index.shape[0], store.shape[1], h, w), dtype=store.dtype, device=store.device,
                       memory_format=_store_format(store))


@torch.library.custom_op(f"{NAMESPACE}::omega_update", mutates_args=("store",),
                         schema="(Tensor(a!) store, Tensor index, Tensor crop, Tensor flip, Tensor src, Tensor g, "
                                "Tensor ratio, str backend) -> ()")
def omega_update_op(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, src: Tensor, g: Tensor, ratio: Tensor,
                    backend: str) -> None:
    """In place on ``store`` (dense, any layout): ``clamp(omega + ratio*sign(g), -1, 1)`` through each window."""
    _impl(backend, store).omega_update(store, index, crop, flip, src, g, _as_step(ratio))


@omega_update_op.register_fake
def _(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, src: Tensor, g: Tensor, ratio: Tensor,
      backend: str) -> None:
    return None


# ---- shared backward rules (eager Functions and registered autograd) ----

# ``op=True`` (registered autograd, traced by the compiler) calls the backward custom op; ``False`` (eager
# Functions) the primitive itself. Either way the same kernel computes the same values.

def _init_backward(saved: tuple[Tensor, ...], eps: float, backend: str, grad_x0: Tensor | None,
                   grad_d0: Tensor | None, op: bool) -> tuple[Tensor | None, Tensor | None]:
    x, omega, a_init = saved
    if grad_x0 is None and grad_d0 is None:
        return None, None
    grad_x0 = torch.zeros_like(x) if grad_x0 is None else grad_x0
    if op:
        grad_x, grad_a = perturb_init_bwd_op(grad_x0, grad_d0, x, omega, a_init, eps, backend)
    else:
        grad_x, grad_a = _impl(backend, x).perturb_init_bwd(_grad_like(x, grad_x0), _grad_like(x, grad_d0), x, omega,
                                                            _as_step(a_init), eps)
    return grad_x, _like_step(grad_a, a_init)


def _step_backward(saved: tuple[Tensor, ...], eps: float, backend: str, grad_x1: Tensor | None,
                   grad_d1: Tensor | None, op: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    x, d, g, a = saved
    if grad_x1 is None and grad_d1 is None:
        return None, None, None
    grad_x1 = torch.zeros_like(x) if grad_x1 is None else grad_x1
    if op:
        grad_x, grad_d, grad_a = sign_step_bwd_op(grad_x1, grad_d1, x, d, g, a, eps, backend)
    else:
        grad_x, grad_d, grad_a = _impl(backend, x).sign_step_bwd(_grad_like(x, grad_x1), _grad_like(x, grad_d1), x, d, g,
                                                                 _as_step(a), eps)
    return grad_x, grad_d, _like_step(grad_a, a)


def _layer_grad_a(grad_out: Tensor, s: Tensor, backend: str, a_dtype: torch.dtype, a_shape: torch.Size,
                  op: bool) -> Tensor:
    if op:
        grad_a = layer_perturb_bwd_op(grad_out, s, backend)
    else:
        grad_a = _impl(backend, grad_out).layer_perturb_bwd(*_layout(grad_out, s))
    return grad_a.to(a_dtype).reshape(a_shape)


# ---- registered autograd of the custom ops (what torch.compile differentiates) ----

def _setup_init(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, omega, a_init, eps, backend = inputs
    ctx.save_for_backward(x, omega, a_init)
    ctx.eps, ctx.backend = eps, backend


def _backward_init(ctx: FunctionCtx, grad_x0: Tensor, grad_d0: Tensor):
    grad_x, grad_a = _init_backward(ctx.saved_tensors, ctx.eps, ctx.backend, grad_x0, grad_d0, op=True)
    return grad_x, None, grad_a, None, None  # x, omega (data), a_init, eps, backend


def _setup_step(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, d, g, a, eps, backend = inputs
    ctx.save_for_backward(x, d, g, a)
    ctx.eps, ctx.backend = eps, backend


def _backward_step(ctx: FunctionCtx, grad_x1: Tensor, grad_d1: Tensor):
    grad_x, grad_d, grad_a = _step_backward(ctx.saved_tensors, ctx.eps, ctx.backend, grad_x1, grad_d1, op=True)
    return grad_x, grad_d, None, grad_a, None, None  # x, d, g (data), a, eps, backend


def _setup_layer(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
    h, s, a, backend = inputs
    ctx.save_for_backward(s)
    ctx.a_dtype, ctx.a_shape, ctx.backend = a.dtype, a.shape, backend


def _backward_layer(ctx: FunctionCtx, grad_out: Tensor):
    (s,) = ctx.saved_tensors
    grad_a = _layer_grad_a(grad_out, s, ctx.backend, ctx.a_dtype, ctx.a_shape, op=True) if ctx.needs_input_grad[2] \
        else None
    return grad_out, None, grad_a, None  # h (additive: dL/dout as is), s (data), a, backend


perturb_init_op.register_autograd(_backward_init, setup_context=_setup_init)
sign_step_op.register_autograd(_backward_step, setup_context=_setup_step)
layer_perturb_op.register_autograd(_backward_layer, setup_context=_setup_layer)


CUSTOM_OPS = tuple(f"{NAMESPACE}::{name}" for name in (
    "perturb_init", "perturb_init_bwd", "sign_step", "sign_step_bwd", "layer_perturb", "layer_perturb_bwd",
    "pack_sign", "pgd_step", "omega_gather", "omega_update"))


# ---- eager autograd Functions (the same rules, calling the primitives directly) ----

class PerturbInit(torch.autograd.Function):
    """``d0 = clamp(a_init*omega, -eps, eps)``, ``x0 = clamp(x + d0, 0, 1)``; differentiable in x and a_init."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, omega: Tensor, a_init: Tensor, eps: float,
                backend: str) -> tuple[Tensor, Tensor]:
        x0, d0 = _impl(backend, x).perturb_init_fwd(x, omega, _as_step(a_init), eps)
        ctx.save_for_backward(x, omega, a_init)
        ctx.eps, ctx.backend = eps, backend
        ctx.set_materialize_grads(False)
        return x0, d0

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_x0: Tensor | None, grad_d0: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_x, grad_a = _init_backward(ctx.saved_tensors, ctx.eps, ctx.backend, grad_x0, grad_d0, op=False)
        return (
            grad_x,  # dL/dx = dL/dx0 * m_img
            None,  # omega is the stored initialisation: data, not differentiated
            grad_a,  # dL/da_init = sum((dL/dd0 + dL/dx0 * m_img) * m_eps0 * omega)
            None,  # eps
            None,  # backend
        )


class SignStep(torch.autograd.Function):
    """``d1 = clamp(d + a*sign(g), -eps, eps)``, ``x1 = clamp(x + d1, 0, 1)``; differentiable in x, d and a."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float,
                backend: str) -> tuple[Tensor, Tensor]:
        x1, d1 = _impl(backend, x).sign_step_fwd(x, d, g, _as_step(a), eps)
        ctx.save_for_backward(x, d, g, a)
        ctx.eps, ctx.backend = eps, backend
        ctx.set_materialize_grads(False)
        return x1, d1

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_x1: Tensor | None, grad_d1: Tensor | None) -> tuple[Tensor | None, ...]:
        grad_x, grad_d, grad_a = _step_backward(ctx.saved_tensors, ctx.eps, ctx.backend, grad_x1, grad_d1, op=False)
        return (
            grad_x,  # dL/dx = dL/dx1 * m_img
            grad_d,  # dL/dd = (dL/dd1 + dL/dx1 * m_img) * m_eps1
            None,  # g enters only through its sign: zero gradient almost everywhere, treated as data
            grad_a,  # dL/da = sum(dL/dd * sign(g))
            None,  # eps
            None,  # backend
        )


class LayerPerturb(torch.autograd.Function):
    """``h + a*s`` with ``s`` the int8 sign of pass 1; saves only ``s``."""

    @staticmethod
    def forward(ctx: FunctionCtx, h: Tensor, s: Tensor, a: Tensor, backend: str) -> Tensor:
        out = _impl(backend, h).layer_perturb_fwd(h, s, _as_step(a))
        ctx.save_for_backward(s)
        ctx.a_dtype, ctx.a_shape, ctx.backend = a.dtype, a.shape, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (s,) = ctx.saved_tensors
        grad_a = _layer_grad_a(grad_out, s, ctx.backend, ctx.a_dtype, ctx.a_shape, op=False) \
            if ctx.needs_input_grad[2] else None
        return (
            grad_out,  # dL/dh = dL/dout: the perturbation is additive (returned as is, no copy)
            None,  # s is the stored sign: data
            grad_a,  # dL/da = sum(dL/dout * s), one fused reduction with fp32 accumulation
            None,  # backend
        )
