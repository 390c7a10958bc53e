"""Per-example initialisation store: gather each example's cropped, flipped window, and update it in place.

``store`` is (N, C, H+2p, W+2p); example ``b`` owns ``store[index[b], :, dy:dy+H, dx:dx+W]`` (``crop[b] = (dy, dx)``),
read right to left when ``flip[b]``. Both kernels tile the image frame (B*C*H rows, W columns) with
``BLOCK_ROWS x BLOCK_W`` tiles (about ``BLOCK_SIZE`` elements): grid ``(cdiv(B*C*H, BLOCK_ROWS), cdiv(W, BLOCK_W))``.
Each program reads every element of its tile once and (update) writes it once. The store and the image-frame
tensor (the gathered output, the update's ``g``) are addressed through their strides, so either may be in any
memory format (NCHW, channels_last); the gathered output takes the store's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import BLOCK_SIZE, NUM_WARPS, clamp, is_dense, on_device, sign_of, step_dtype, tl_dtype


@triton.jit
def _omega_window(
    index_ptr,
    crop_ptr,
    flip_ptr,
    pid_r,
    pid_w,
    n_rows,
    C,
    H,
    W,
    ss0,
    ss1,
    ss2,
    ss3,
    fs0,
    fs1,
    fs2,
    fs3,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Offsets of a tile in the image frame and in the store (through their strides ``fs*``, ``ss*``), its mask,
    each row's example and row mask."""
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    row_mask = rows < n_rows
    y = rows % H
    bc = rows // H
    c = bc % C
    b = bc // C
    idx = tl.load(index_ptr + b, mask=row_mask, other=0).to(tl.int64)
    dy = tl.load(crop_ptr + 2 * b, mask=row_mask, other=0).to(tl.int64)
    dx = tl.load(crop_ptr + 2 * b + 1, mask=row_mask, other=0).to(tl.int64)
    flipped = tl.load(flip_ptr + b, mask=row_mask, other=0) != 0
    src_cols = tl.where(flipped[:, None], (W - 1) - cols[None, :], cols[None, :]) + dx[:, None]
    store_offs = (idx * ss0 + c * ss1 + (dy + y) * ss2)[:, None] + src_cols * ss3
    frame_offs = (b * fs0 + c * fs1 + y * fs2)[:, None] + cols[None, :].to(tl.int64) * fs3
    mask = row_mask[:, None] & (cols < W)[None, :]
    return frame_offs, store_offs, mask, b, row_mask


@triton.jit
def _omega_gather_fwd_kernel(
    store_ptr,
    index_ptr,
    crop_ptr,
    flip_ptr,
    out_ptr,
    n_rows,
    C,
    H,
    W,
    ss0,
    ss1,
    ss2,
    ss3,
    fs0,
    fs1,
    fs2,
    fs3,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_w = tl.program_id(1).to(tl.int64)
    frame_offs, store_offs, mask, _, _ = _omega_window(
        index_ptr, crop_ptr, flip_ptr, pid_r, pid_w, n_rows, C, H, W, ss0, ss1, ss2, ss3, fs0, fs1, fs2, fs3, BLOCK_ROWS,
        BLOCK_W
    )
    tl.store(out_ptr + frame_offs, tl.load(store_ptr + store_offs, mask=mask), mask=mask)


@triton.jit
def _omega_update_fwd_kernel(
    store_ptr,
    index_ptr,
    crop_ptr,
    flip_ptr,
    src_ptr,
    g_ptr,
    ratio_ptr,
    n_rows,
    C,
    H,
    W,
    ss0,
    ss1,
    ss2,
    ss3,
    fs0,
    fs1,
    fs2,
    fs3,
    PROD: tl.constexpr,  # arithmetic dtype of omega + ratio*sign(g) in the reference (see _utils.step_dtype)
    ROUND_A: tl.constexpr,  # 0-d ratio, fp16/bf16 store: ratio and omega + ratio*sign(g) are the store's dtype
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_w = tl.program_id(1).to(tl.int64)
    frame_offs, store_offs, mask, b, row_mask = _omega_window(
        index_ptr, crop_ptr, flip_ptr, pid_r, pid_w, n_rows, C, H, W, ss0, ss1, ss2, ss3, fs0, fs1, fs2, fs3, BLOCK_ROWS,
        BLOCK_W
    )
    # Only the first occurrence of an example writes: each store element then has one writer, which
    # also is its only reader, so there is no race and the result equals the reference's.
    first = tl.load(src_ptr + b, mask=row_mask, other=-1).to(tl.int64) == b
    mask = mask & first[:, None]
    sdt = store_ptr.dtype.element_ty
    ratio = tl.load(ratio_ptr)
    if ROUND_A:
        ratio = ratio.to(sdt)
    ratio = ratio.to(PROD)
    omega = tl.load(store_ptr + store_offs, mask=mask, other=0.0).to(PROD)
    s = sign_of(tl.load(g_ptr + frame_offs, mask=mask, other=0.0), PROD)
    v = omega + ratio * s
    if ROUND_A:
        v = v.to(sdt).to(PROD)  # +-1 are exact in sdt: rounding before the clamp equals rounding after it
    new = clamp(v, -1.0, 1.0)
    tl.store(store_ptr + store_offs, new.to(store_ptr.dtype.element_ty), mask=mask)


def _check_store(op: str, store: torch.Tensor) -> None:
    """The store is written in place through its strides: it must not overlap itself (any dense layout works)."""
    if store.dim() != 4 or not is_dense(store):
        raise ValueError(f"apart_fast.kernels.{op}: store must be a dense (N, C, H+2p, W+2p) tensor, got shape "
                         f"{tuple(store.shape)} and strides {store.stride()}; pass store.contiguous()")


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a dense 4-D tensor is channels_last (and not also contiguous, as (N, 1, 1, 1) tensors are both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _tiles(n_rows: int, w: int) -> tuple[int, int, tuple[int, int]]:
    """``(BLOCK_ROWS, BLOCK_W, grid)`` for an image frame of ``n_rows`` rows of ``w`` columns."""
    block_w = min(triton.next_power_of_2(max(w, 1)), BLOCK_SIZE)
    block_rows = max(BLOCK_SIZE // block_w, 1)
    return block_rows, block_w, (triton.cdiv(n_rows, block_rows), triton.cdiv(w, block_w))


def omega_gather(
    store: torch.Tensor,
    index: torch.Tensor,
    crop: torch.Tensor,
    flip: torch.Tensor,
    src: torch.Tensor | None,
    H: int,
    W: int,
) -> torch.Tensor:
    """Each example's (C, H, W) window of ``store``, cropped then flipped: (B, C, H, W) in store's dtype and memory format.

    ``src`` is not read (gathering is the same for duplicates); it keeps the signature of ``omega_update``.
    """
    _check_store("omega_gather", store)
    B, C = index.shape[0], store.shape[1]
    fmt = torch.channels_last if _channels_last(store) else torch.contiguous_format
    out = torch.empty((B, C, H, W), dtype=store.dtype, device=store.device, memory_format=fmt)
    n_rows = B * C * H
    if out.numel() == 0:
        return out
    block_rows, block_w, grid = _tiles(n_rows, W)
    with on_device(store):
        _omega_gather_fwd_kernel[grid](
            store,
            index,
            crop,
            flip.view(torch.uint8) if flip.dtype == torch.bool else flip,
            out,
            n_rows,
            C,
            H,
            W,
            *store.stride(),
            *out.stride(),
            BLOCK_ROWS=block_rows,
            BLOCK_W=block_w,
            num_warps=NUM_WARPS,
        )
    return out


def omega_update(
    store: torch.Tensor,
    index: torch.Tensor,
    crop: torch.Tensor,
    flip: torch.Tensor,
    src: torch.Tensor,
    g: torch.Tensor,
    ratio: torch.Tensor,
) -> None:
    """In place: ``omega <- clamp(omega + ratio*sign(g), -1, 1)`` on each example's window, first occurrences only.

    ``src`` is ``reference.first_position(index)``; ``g`` is (B, C, H, W) in the image frame (any strides);
    ``ratio`` one element.
    """
    _check_store("omega_update", store)
    B, C, H, W = g.shape
    n_rows = B * C * H
    if g.numel() == 0:
        return
    block_rows, block_w, grid = _tiles(n_rows, W)
    prod, round_a = step_dtype(ratio, store.dtype)
    with on_device(store):
        _omega_update_fwd_kernel[grid](
            store,
            index,
            crop,
            flip.view(torch.uint8) if flip.dtype == torch.bool else flip,
            src,
            g,
            ratio,
            n_rows,
            C,
            H,
            W,
            *store.stride(),
            *g.stride(),
            PROD=tl_dtype(prod),
            ROUND_A=round_a,
            BLOCK_ROWS=block_rows,
            BLOCK_W=block_w,
            num_warps=NUM_WARPS,
        )
