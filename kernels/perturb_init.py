"""APART initialisation ``d0 = clamp(a_init*omega, -eps, eps)``, ``x0 = clamp(x + d0, 0, 1)``: forward and backward.

Both kernels run over the flattened elements, one ``BLOCK_SIZE`` block per program (grid ``cdiv(n, BLOCK_SIZE)``).
The backward recomputes ``d0`` and the masks from ``x``, ``omega`` and ``a_init`` instead of saving them, and
writes one fp32 (fp64 for fp64 data) partial of ``dL/da_init`` per program; ``torch.sum`` adds the partials.
Values are rounded to the storage dtype wherever the reference holds a tensor of that dtype, so fp32 results
(and the masks in every dtype) equal the reference's exactly.
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
    split_scalar,
    step_launch,
    sum_partials,
    wide_scalar,
)


@triton.jit
def _perturb_init_inputs(x_ptr, omega_ptr, a_init_ptr, offs, mask, eps_hi, eps_mid, eps_lo, COMPUTE: tl.constexpr,
                         PROD: tl.constexpr, ROUND_A: tl.constexpr):
    """Forward and backward alike: x, omega, ``v = a_init*omega`` and eps, rounded where the reference rounds."""
    odt = omega_ptr.dtype.element_ty
    a = tl.load(a_init_ptr)
    eps = wide_scalar(eps_hi, eps_mid, eps_lo, PROD)
    if ROUND_A:  # the clamped value is a tensor of the data's dtype: so is its bound (_utils.step_launch)
        a = a.to(odt)
        eps = eps.to(odt).to(PROD)
    a = a.to(PROD)
    omega = tl.load(omega_ptr + offs, mask=mask, other=0.0).to(PROD)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    v = a * omega
    if ROUND_A:
        v = v.to(odt).to(PROD)
    return x, omega, v, eps


@triton.jit
def _perturb_init_fwd_kernel(
    x_ptr,
    omega_ptr,
    a_init_ptr,
    x0_ptr,
    d0_ptr,
    n_elements,
    eps_hi,
    eps_mid,
    eps_lo,
    COMPUTE: tl.constexpr,  # arithmetic dtype of x (fp32, or fp64 for fp64 data)
    PROD: tl.constexpr,  # arithmetic dtype of a_init*omega in the reference (see _utils.step_dtype)
    ROUND_A: tl.constexpr,  # 0-d a_init, fp16/bf16 omega: a_init, a_init*omega and eps are omega's dtype
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x, omega, v, eps = _perturb_init_inputs(x_ptr, omega_ptr, a_init_ptr, offs, mask, eps_hi, eps_mid, eps_lo, COMPUTE,
                                            PROD, ROUND_A)
    d0 = clamp(v, -eps, eps).to(x0_ptr.dtype.element_ty)
    x0 = clamp(x + d0.to(COMPUTE), 0.0, 1.0)
    tl.store(d0_ptr + offs, d0, mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _perturb_init_bwd_kernel(
    grad_x0_ptr,
    grad_d0_ptr,
    x_ptr,
    omega_ptr,
    a_init_ptr,
    grad_x_ptr,
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
    x, omega, v, eps = _perturb_init_inputs(x_ptr, omega_ptr, a_init_ptr, offs, mask, eps_hi, eps_mid, eps_lo, COMPUTE,
                                            PROD, ROUND_A)
    m_eps0 = inside(v, -eps, eps, BOUND_PASSES)
    d0 = clamp(v, -eps, eps).to(dtype).to(COMPUTE)
    # x + d0 is a tensor of x's dtype in the reference: round it before testing the image bounds.
    m_img = inside((x + d0).to(dtype).to(COMPUTE), 0.0, 1.0, BOUND_PASSES)
    grad_x0 = tl.load(grad_x0_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    grad_x = tl.where(m_img, grad_x0, 0.0)
    tl.store(grad_x_ptr + offs, grad_x.to(dtype), mask=mask)
    total = grad_x
    if HAS_GRAD_D:
        # autograd adds the two gradients of d0 in d0's dtype
        total = (total + tl.load(grad_d0_ptr + offs, mask=mask, other=0.0).to(COMPUTE)).to(dtype).to(COMPUTE)
    term = tl.where(m_eps0, total.to(PROD), 0.0) * omega
    tl.store(partial_ptr + pid, tl.sum(term, axis=0))


def perturb_init_fwd(x: torch.Tensor, omega: torch.Tensor, a_init: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, d0)`` in x's dtype; ``omega`` may have another dtype, ``a_init`` is a one-element tensor.

    A 0-d ``a_init`` rounds like the reference's (cast to omega's dtype before the product), a (1,) one does not.
    ``x`` dense in any memory format, ``omega`` laid out like it; the outputs keep that layout.
    """
    check_layout("perturb_init_fwd", x=x, omega=omega)
    x0 = torch.empty_like(x)
    d0 = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return x0, d0
    _, meta = step_launch(x, a_init, omega.dtype)
    with on_device(x):
        _perturb_init_fwd_kernel[(num_programs(n),)](
            x,
            omega,
            a_init,
            x0,
            d0,
            n,
            *split_scalar(float(eps)),
            **meta,
        )
    return x0, d0


def perturb_init_bwd(
    grad_x0: torch.Tensor,
    grad_d0: torch.Tensor | None,
    x: torch.Tensor,
    omega: torch.Tensor,
    a_init: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_a_init)``: ``grad_x`` in x's dtype, ``grad_a_init`` shaped and typed like ``a_init``."""
    check_layout("perturb_init_bwd", x=x, omega=omega, grad_x0=grad_x0, grad_d0=grad_d0)
    grad_x = torch.empty_like(x)
    n = x.numel()
    prod, meta = step_launch(x, a_init, omega.dtype)
    grid = num_programs(n)
    partials = torch.empty(grid, dtype=prod, device=x.device)  # every program writes its partial
    if n > 0:
        with on_device(x):
            _perturb_init_bwd_kernel[(grid,)](
                grad_x0,
                grad_d0 if grad_d0 is not None else grad_x0,
                x,
                omega,
                a_init,
                grad_x,
                partials,
                n,
                *split_scalar(float(eps)),
                BOUND_PASSES=clamp_grad_passes_at_bound(),
                HAS_GRAD_D=grad_d0 is not None,
                **meta,
            )
    return grad_x, sum_partials(partials, a_init, a_init.dtype)
