"""``sign(g)`` stored as int8 (-1, 0, 1): grid ``cdiv(n, BLOCK_SIZE)`` over the flattened elements."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import BLOCK_SIZE, NUM_WARPS, check_layout, num_programs, on_device


@triton.jit
def _pack_sign_fwd_kernel(g_ptr, s_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    s = (g > 0).to(tl.int8) - (g < 0).to(tl.int8)
    tl.store(s_ptr + offs, s, mask=mask)


def pack_sign(g: torch.Tensor) -> torch.Tensor:
    """``torch.sign(g).to(torch.int8)``, same shape and memory format as ``g``."""
    check_layout("pack_sign", g=g)
    s = torch.empty_like(g, dtype=torch.int8)
    n = g.numel()
    if n > 0:
        with on_device(g):
                _pack_sign_fwd_kernel[(num_programs(n),)](g, s, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return s
