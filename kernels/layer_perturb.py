"""Layer-wise perturbation of pass 2, ``out = h + a*s`` with ``s`` the int8 sign of pass 1: forward and backward.

Grid ``cdiv(n, BLOCK_SIZE)`` over the flattened elements. The backward only reduces: one partial of
``dL/da = sum(grad_out * s)`` per program (fp32, fp64 for fp64 gradients), summed by ``torch.sum``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import BLOCK_SIZE, NUM_WARPS, check_layout, compute_dtype, num_programs, on_device, sum_partials, tl_dtype


@triton.jit
def _layer_perturb_fwd_kernel(
    h_ptr,
    s_ptr,
    a_ptr,
    out_ptr,
    n_elements,
    COMPUTE: tl.constexpr,  # arithmetic dtype of h (fp32, or fp64 for fp64 data)
    PROD: tl.constexpr,  # dtype of a*s in the reference (promotion of a and h)
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dtype = out_ptr.dtype.element_ty
    a = tl.load(a_ptr).to(PROD)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    s = tl.load(s_ptr + offs, mask=mask, other=0).to(PROD)
    # the reference rounds a*s to h's dtype before adding it
    p = (a * s).to(dtype).to(COMPUTE)
    tl.store(out_ptr + offs, (h + p).to(dtype), mask=mask)


@triton.jit
def _layer_perturb_bwd_kernel(
    grad_out_ptr,
    s_ptr,
    partial_ptr,
    n_elements,
    ACC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    grad = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(partial_ptr + pid, tl.sum(grad * s, axis=0))


def layer_perturb_fwd(h: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``h + a*s`` in h's dtype and memory format; ``s`` int8 laid out like h, ``a`` a one-element tensor."""
    check_layout("layer_perturb_fwd", h=h, s=s)
    out = torch.empty_like(h)
    n = h.numel()
    if n > 0:
        with on_device(h):
            _layer_perturb_fwd_kernel[(num_programs(n),)](
                h,
                s,
                a,
                out,
                n,
                COMPUTE=tl_dtype(compute_dtype(h.dtype)),
                PROD=tl_dtype(compute_dtype(h.dtype, a.dtype)),
                BLOCK_SIZE=BLOCK_SIZE,
                num_warps=NUM_WARPS,
            )
    return out


def layer_perturb_bwd(grad_out: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dL/da = sum(grad_out * s)`` as a (1,) tensor of ``dtype`` (default fp32, fp64 for fp64 gradients).

    Accumulates in fp32 (fp64 when ``dtype`` or ``grad_out`` is fp64); pass ``dtype=a.dtype``.
    """
    check_layout("layer_perturb_bwd", grad_out=grad_out, s=s)
    acc = compute_dtype(grad_out.dtype, dtype or torch.float32)
    n = grad_out.numel()
    grid = num_programs(n)
    partials = torch.empty(grid, dtype=acc, device=grad_out.device)  # every program writes its partial
    if n > 0:
        with on_device(grad_out):
            _layer_perturb_bwd_kernel[(grid,)](grad_out, s, partials, n, ACC=tl_dtype(acc), BLOCK_SIZE=BLOCK_SIZE,
                                               num_warps=NUM_WARPS)
    return sum_partials(partials, None, dtype or acc)
