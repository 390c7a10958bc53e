"""Learnable sign step ``d1 = clamp(d + a*sign(g), -eps, eps)``, ``x1 = clamp(x + d1, 0, 1)``: forward and backward.

Grid ``cdiv(n, BLOCK_SIZE)`` over the flattened elements. The backward recomputes ``d1`` and the masks, writes
``grad_x`` and ``grad_d`` and one partial of ``dL/da`` per program (summed by ``torch.sum``, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    check_layout,
    clamp,
    clamp_grad_passes_at_bound,
    inside,
    num_programs,
    on_device,
    sign_of,
    split_scalar,
    step_launch,
    sum_partials,
    wide_scalar,
)


@triton.jit
def _sign_step_inputs(x_ptr, d_ptr, g_ptr, a_ptr, offs, mask, eps_hi, eps_mid, eps_lo, COMPUTE: tl.constexpr,
                      PROD: tl.constexpr, ROUND_A: tl.constexpr):
    """Forward and backward alike: x, sign(g), ``v = d + a*sign(g)`` and eps, rounded where the reference rounds."""
    ddt = d_ptr.dtype.element_ty
    a = tl.load(a_ptr)
    eps = wide_scalar(eps_hi, eps_mid, eps_lo, PROD)
    if ROUND_A:  # the clamped value is a tensor of the data's dtype: so is its bound (_utils.step_launch)
        a = a.to(ddt)
        eps = eps.to(ddt).to(PROD)
    a = a.to(PROD)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(PROD)
    s = sign_of(tl.load(g_ptr + offs, mask=mask, other=0.0), PROD)
    v = d + a * s  # a*s is exact (s in -1, 0, 1), so only the sum needs rounding
    if ROUND_A:
        v = v.to(ddt).to(PROD)
    return x, s, v, eps


@triton.jit
def _sign_step_fwd_kernel(
    x_ptr,
    d_ptr,
    g_ptr,
    a_ptr,
    x1_ptr,
    d1_ptr,
    n_elements,
    eps_hi,
    eps_mid,
    eps_lo,
    COMPUTE: tl.constexpr,  # arithmetic dtype of x (fp32, or fp64 for fp64 data)
    PROD: tl.constexpr,  # arithmetic dtype of d + a*sign(g) in the reference (see _utils.step_dtype)
    ROUND_A: tl.constexpr,  # 0-d a, fp16/bf16 d: a, a*sign(g), d + a*sign(g) and eps are d's dtype
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dtype = x1_ptr.dtype.element_ty
    x, s, v, eps = _sign_step_inputs(x_ptr, d_ptr, g_ptr, a_ptr, offs, mask, eps_hi, eps_mid, eps_lo, COMPUTE, PROD,
                                     ROUND_A)
    d1 = clamp(v, -eps, eps).to(dtype)
    x1 = clamp(x + d1.to(COMPUTE), 0.0, 1.0)
    tl.store(d1_ptr + offs, d1, mask=mask)
    tl.store(x1_ptr + offs, x1.to(dtype), mask=mask)


@triton.jit
def _sign_step_bwd_kernel(
    grad_x1_ptr,
    grad_d1_ptr,
    x_ptr,
    d_ptr,
    g_ptr,
    a_ptr,
    grad_x_ptr,
    grad_d_ptr,
    partial_ptr,
    n_elements,
    eps_hi,
    eps_mid,
    eps_lo,
    HAS_GRAD_D: tl.constexpr,
    BOUND_PASSES: tl.constexpr,  # clamp's gradient passes at exactly its bound (PyTorch-version dependent)
    COMPUTE: tl.constexpr,
    PROD: tl.constexpr,
    ROUND_A: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dtype = grad_x_ptr.dtype.element_ty
    x, s, v, eps = _sign_step_inputs(x_ptr, d_ptr, g_ptr, a_ptr, offs, mask, eps_hi, eps_mid, eps_lo, COMPUTE, PROD,
                                     ROUND_A)
    m_eps1 = inside(v, -eps, eps, BOUND_PASSES)
    d1 = clamp(v, -eps, eps).to(dtype).to(COMPUTE)
    # x + d1 is a tensor of x's dtype in the reference: round it before testing the image bounds.
    m_img = inside((x + d1).to(dtype).to(COMPUTE), 0.0, 1.0, BOUND_PASSES)
    grad_x1 = tl.load(grad_x1_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    grad_x = tl.where(m_img, grad_x1, 0.0)
    tl.store(grad_x_ptr + offs, grad_x.to(dtype), mask=mask)
    total = grad_x
    if HAS_GRAD_D:
        # autograd adds the two gradients of d1 in d1's dtype
        total = (total + tl.load(grad_d1_ptr + offs, mask=mask, other=0.0).to(COMPUTE)).to(dtype).to(COMPUTE)
    grad_v = tl.where(m_eps1, total.to(PROD), 0.0)
    tl.store(grad_d_ptr + offs, grad_v.to(grad_d_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(grad_v * s, axis=0))


def sign_step_fwd(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor, a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x1, d1)`` in x's dtype; ``g`` of any floating dtype (only its sign is read), ``a`` one element.

    ``x`` dense in any memory format, ``d`` and ``g`` laid out like it; the outputs keep that layout.
    """
    check_layout("sign_step_fwd", x=x, d=d, g=g)
    x1 = torch.empty_like(x)
    d1 = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return x1, d1
    _, meta = step_launch(x, a, d.dtype)
    with on_device(x):
        _sign_step_fwd_kernel[(num_programs(n),)](
            x,
            d,
            g,
            a,
            x1,
            d1,
            n,
            *split_scalar(float(eps)),
            **meta,
        )
    return x1, d1


def sign_step_bwd(
    grad_x1: torch.Tensor,
    grad_d1: torch.Tensor | None,
    x: torch.Tensor,
    d: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_d, grad_a)``: like ``x``, like ``d``, and shaped and typed like ``a``."""
    check_layout("sign_step_bwd", x=x, d=d, g=g, grad_x1=grad_x1, grad_d1=grad_d1)
    grad_x = torch.empty_like(x)
    grad_d = torch.empty_like(d)
    n = x.numel()
    prod, meta = step_launch(x, a, d.dtype)
    grid = num_programs(n)
    partials = torch.empty(grid, dtype=prod, device=x.device)  # every program writes its partial
    if n > 0:
        with on_device(x):
            _sign_step_bwd_kernel[(grid,)](
                grad_x1,
                grad_d1 if grad_d1 is not None else grad_x1,
                x,
                d,
                g,
                a,
                grad_x,
                grad_d,
                partials,
                n,
                *split_scalar(float(eps)),
                BOUND_PASSES=clamp_grad_passes_at_bound(),
                HAS_GRAD_D=grad_d1 is not None,
                **meta,
            )
    return grad_x, grad_d, sum_partials(partials, a, a.dtype)
