"""One PGD step ``clamp(min(max(x_adv + step*sign(g), x - eps), x + eps), 0, 1)``: grid ``cdiv(n, BLOCK_SIZE)``.

Like PyTorch on fp16/bf16, ``step*sign(g)``, the sum and ``x -+ eps`` are each rounded to x's dtype; eps itself
is rounded to x's dtype first on CPU tensors only (``_utils.rounds_bound``: PyTorch's CUDA kernels keep it in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    BLOCK_SIZE,
    NUM_WARPS,
    check_layout,
    clamp,
    compute_dtype,
    num_programs,
    on_device,
    rounds_bound,
    sign_of,
    split_scalar,
    tl_dtype,
    wide_scalar,
)


@triton.jit
def _pgd_step_fwd_kernel(
    x_adv_ptr,
    x_ptr,
    g_ptr,
    out_ptr,
    n_elements,
    step_hi,
    step_mid,
    step_lo,
    eps_hi,
    eps_mid,
    eps_lo,
    COMPUTE: tl.constexpr,
    ROUND_EPS: tl.constexpr,  # eps is rounded to x's dtype before x -+ eps (PyTorch's CPU convention)
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dtype = out_ptr.dtype.element_ty
    step = wide_scalar(step_hi, step_mid, step_lo, COMPUTE)
    eps = wide_scalar(eps_hi, eps_mid, eps_lo, COMPUTE)
    if ROUND_EPS:
        eps = eps.to(dtype).to(COMPUTE)
    x_adv = tl.load(x_adv_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    s = sign_of(tl.load(g_ptr + offs, mask=mask, other=0.0), COMPUTE)
    z = (x_adv + (step * s).to(dtype).to(COMPUTE)).to(dtype).to(COMPUTE)
    lo = (x - eps).to(dtype).to(COMPUTE)
    hi = (x + eps).to(dtype).to(COMPUTE)
    z = tl.where(z < lo, lo, z)
    z = tl.where(z > hi, hi, z)
    tl.store(out_ptr + offs, clamp(z, 0.0, 1.0).to(dtype), mask=mask)


def pgd_step(x_adv: torch.Tensor, x: torch.Tensor, g: torch.Tensor, step: float, eps: float) -> torch.Tensor:
    """The next PGD iterate, in x_adv's dtype and memory format (x and g laid out like x_adv)."""
    check_layout("pgd_step", x_adv=x_adv, x=x, g=g)
    out = torch.empty_like(x_adv)
    n = x_adv.numel()
    if n == 0:
        return out
    with on_device(x_adv):
        _pgd_step_fwd_kernel[(num_programs(n),)](
            x_adv,
            x,
            g,
            out,
            n,
            *split_scalar(float(step)),
            *split_scalar(float(eps)),
            COMPUTE=tl_dtype(compute_dtype(x_adv.dtype)),
            ROUND_EPS=rounds_bound(x_adv, x_adv.dtype in (torch.float16, torch.bfloat16)),
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
        )
    return out
