"""Autograd Functions over a backend's raw primitives (see ``dispatch.PRIMITIVES``).

Each Function saves only its inputs (``layer_perturb`` only the int8 sign) and recomputes the
clamped values and masks in backward: no fp32 buffer outlives the forward. Backward is not itself
differentiable (``once_differentiable``). Nothing here syncs with the host, so the ops can be
captured in a CUDA graph. The step-size gradients come back from the backend as one-element fp32
(fp64) sums and are cast to the step size's own dtype and shape here.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _as_step(a: Tensor) -> Tensor:
    """A one-element step size as the (1,)-shaped contiguous tensor the primitives take (a view)."""
    return a.reshape(1).contiguous()


def _like_step(grad: Tensor, a: Tensor) -> Tensor:
    return grad.to(a.dtype).reshape(a.shape)


class PerturbInit(torch.autograd.Function):
    """``d0 = clamp(a_init*omega, -eps, eps)``, ``x0 = clamp(x + d0, 0, 1)``; differentiable in x and a_init."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, omega: Tensor, a_init: Tensor, eps: float,
                impl: ModuleType) -> tuple[Tensor, Tensor]:
        x0, d0 = impl.perturb_init_fwd(x, omega, _as_step(a_init), eps)
        ctx.save_for_backward(x, omega, a_init)
        ctx.eps, ctx.impl = eps, impl
        ctx.set_materialize_grads(False)
        return x0, d0

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_x0: Tensor | None, grad_d0: Tensor | None):
        x, omega, a_init = ctx.saved_tensors
        if grad_x0 is None and grad_d0 is None:
            return None, None, None, None, None
        grad_x0 = torch.zeros_like(x) if grad_x0 is None else grad_x0.contiguous()
        grad_d0 = None if grad_d0 is None else grad_d0.contiguous()
        grad_x, grad_a = ctx.impl.perturb_init_bwd(grad_x0, grad_d0, x, omega, _as_step(a_init), ctx.eps)
        return (
            grad_x,  # dL/dx = dL/dx0 * m_img
            None,  # omega is the stored initialisation: data, not differentiated
            _like_step(grad_a, a_init),  # dL/da_init = sum((dL/dd0 + dL/dx0 * m_img) * m_eps0 * omega)
            None,  # eps
            None,  # impl
        )


class SignStep(torch.autograd.Function):
    """``d1 = clamp(d + a*sign(g), -eps, eps)``, ``x1 = clamp(x + d1, 0, 1)``; differentiable in x, d and a."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float,
                impl: ModuleType) -> tuple[Tensor, Tensor]:
        x1, d1 = impl.sign_step_fwd(x, d, g, _as_step(a), eps)
        ctx.save_for_backward(x, d, g, a)
        ctx.eps, ctx.impl = eps, impl
        ctx.set_materialize_grads(False)
        return x1, d1

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_x1: Tensor | None, grad_d1: Tensor | None):
        x, d, g, a = ctx.saved_tensors
        if grad_x1 is None and grad_d1 is None:
            return None, None, None, None, None, None
        grad_x1 = torch.zeros_like(x) if grad_x1 is None else grad_x1.contiguous()
        grad_d1 = None if grad_d1 is None else grad_d1.contiguous()
        grad_x, grad_d, grad_a = ctx.impl.sign_step_bwd(grad_x1, grad_d1, x, d, g, _as_step(a), ctx.eps)
        return (
            grad_x,  # dL/dx = dL/dx1 * m_img
            grad_d,  # dL/dd = (dL/dd1 + dL/dx1 * m_img) * m_eps1
            None,  # g enters only through its sign: zero gradient almost everywhere, treated as data
            _like_step(grad_a, a),  # dL/da = sum(dL/dd * sign(g))
            None,  # eps
            None,  # impl
        )


class LayerPerturb(torch.autograd.Function):
    """``h + a*s`` with ``s`` the int8 sign of pass 1; saves only ``s``."""

    @staticmethod
    def forward(ctx: FunctionCtx, h: Tensor, s: Tensor, a: Tensor, impl: ModuleType) -> Tensor:
        out = impl.layer_perturb_fwd(h, s, _as_step(a))
        ctx.save_for_backward(s)
        ctx.a_dtype, ctx.a_shape, ctx.impl = a.dtype, a.shape, impl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor):
        (s,) = ctx.saved_tensors
        grad_a = None
        if ctx.needs_input_grad[2]:
            grad_a = ctx.impl.layer_perturb_bwd(grad_out.contiguous(), s).to(ctx.a_dtype).reshape(ctx.a_shape)
        return (
            grad_out,  # dL/dh = dL/dout: the perturbation is additive (returned as is, no copy)
            None,  # s is the stored sign: data
            grad_a,  # dL/da = sum(dL/dout * s), one fused reduction with fp32 accumulation
            None,  # impl
        )
