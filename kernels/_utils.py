"""Shared pieces of the Triton kernels: jit helpers (sign, clamp, wide scalars) and host-side helpers."""

from __future__ import annotations

import contextlib
import functools
import math
import struct

import torch
import triton
import triton.language as tl

from apart_fast.ops.dispatch import is_dense, same_layout

# Elements per program of the elementwise kernels and warps per program (1024 fp32 = 8 per thread at 4 warps).
BLOCK_SIZE = 1024
NUM_WARPS = 4

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a floating torch dtype (fp16, bf16, fp32, fp64)."""
    try:
        return _TL_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"apart_fast.kernels: unsupported dtype {dtype}; expected fp16, bf16, fp32 or fp64") from None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for tensors of ``dtypes``: their promotion, at least fp32 (fp64 stays fp64)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def rounds_bound(data: torch.Tensor, rounded: bool) -> bool:
    """Whether a Python-scalar operand (pgd_step's eps in ``x -+ eps``) is rounded to ``data``'s dtype first.

    ``rounded``: the tensor it meets is fp16/bf16. PyTorch's CPU arithmetic kernels cast a scalar operand to the
    tensor's dtype; its CUDA ones read it in the opmath type (fp32) unrounded. The kernels follow their tensors'
    device (CPU tensors run only under ``TRITON_INTERPRET=1``). Clamp bounds need no such rule: see ``step_launch``.
    """
    return rounded and data.device.type == "cpu"


def check_layout(op: str, **tensors: torch.Tensor | None) -> None:
    """The elementwise kernels run over memory order: the first tensor dense, the others laid out like it."""
    (ref_name, ref), *rest = tensors.items()
    if not is_dense(ref):
        raise ValueError(f"apart_fast.kernels.{op}: {ref_name} with strides {ref.stride()} is not dense; "
                         f"pass {ref_name}.contiguous() (any dense memory format works)")
    for name, t in rest:
        if t is not None and not same_layout(t, ref):
            raise ValueError(f"apart_fast.kernels.{op}: {name} has shape {tuple(t.shape)} and strides {t.stride()} but "
                             f"{ref_name} has {tuple(ref.shape)} and {ref.stride()}; pass {name} in {ref_name}'s memory "
                             f"format (torch.empty_like({ref_name}).copy_({name}))")


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch context for kernels on ``t``: its CUDA device current (cuda:N), nothing for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def step_dtype(step: torch.Tensor, data_dtype: torch.dtype) -> tuple[torch.dtype, bool]:
    """``(PROD, ROUND_A)`` of ``step * data`` as PyTorch promotes it, for a step size tensor and data of ``data_dtype``.

    A ``(1,)``-shaped step takes part in type promotion: the product is formed in ``promote(step, data)``, at
    least fp32 (``PROD``). A 0-d step does not: PyTorch casts it to the data's dtype first, so the product,
    and everything the reference forms from it, is a tensor of the data's dtype. The kernels then compute in
    ``compute_dtype(data_dtype)`` and, for fp16/bf16 data (``ROUND_A``), round the step, the product (and
    the clamp bounds) to the data's dtype where the reference does.
    """
    if step.dim() == 0:
        return compute_dtype(data_dtype), data_dtype in (torch.float16, torch.bfloat16)
    return compute_dtype(step.dtype, data_dtype), False


def step_launch(x: torch.Tensor, step: torch.Tensor, data_dtype: torch.dtype) -> tuple[torch.dtype, dict]:
    """``(PROD dtype, launch constants)`` of a step-size kernel (perturb_init, sign_step; forward and backward)
    on image ``x``, with ``step`` multiplying data of ``data_dtype``: COMPUTE, PROD, ROUND_A, BLOCK_SIZE and
    num_warps, so every such launch derives them the same way (``step_dtype``).

    The same on every device: where ``ROUND_A`` makes the clamped value a tensor of the data's dtype, the kernels
    round the clamp bound eps to that dtype too. The forward output is the same with either bound (the clamped
    value is rounded to that dtype afterwards), and autograd's clamp mask is ``lo < v < hi`` (or ``<=``) with a
    Python-scalar bound, whose compare kernels cast the scalar to ``v``'s dtype on the CPU and on CUDA alike.
    """
    prod, round_a = step_dtype(step, data_dtype)
    return prod, dict(COMPUTE=tl_dtype(compute_dtype(x.dtype)), PROD=tl_dtype(prod), ROUND_A=round_a,
                      BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)


@functools.lru_cache(maxsize=256)
def split_scalar(value: float) -> tuple[float, float, float]:
    """Split a python float into three fp32-exact parts whose fp64 sum is ``value`` exactly.

    Scalar kernel arguments are fp32; fp64 kernels rebuild the double with ``wide_scalar``, fp32
    kernels use the first part, which is ``value`` rounded to fp32 as PyTorch rounds a scalar bound.
    """
    hi = _to_f32(value)
    if not math.isfinite(hi):
        return hi, 0.0, 0.0
    rest = value - hi
    mid = _to_f32(rest)
    lo = _to_f32(rest - mid)
    return hi, mid, lo


def _to_f32(value: float) -> float:
    """``value`` rounded to the nearest fp32 (overflow goes to +-inf)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


@functools.cache
def clamp_grad_passes_at_bound() -> bool:
    """Whether the installed PyTorch's ``clamp`` with scalar bounds passes the gradient at exactly a bound.

    The reference's gradients are PyTorch autograd's, and PyTorch's convention is version-dependent (older
    releases pass it, ``lo <= v <= hi``; 2.14 blocks it, ``lo < v < hi``), so it is measured once, on the CPU.
    """
    with torch.inference_mode(False), torch.enable_grad():
        v = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(torch.clamp(v, 0.0, 1.0).sum(), v)
    lo_passes, hi_passes = (bool(g != 0) for g in grad)
    if lo_passes != hi_passes:
        raise RuntimeError(f"apart_fast.kernels: torch.clamp's gradient at its bounds is asymmetric ({grad.tolist()})")
    return lo_passes


def num_programs(n_elements: int, block: int = BLOCK_SIZE) -> int:
    """Programs of a 1-D grid covering ``n_elements`` in blocks of ``block``."""
    return triton.cdiv(n_elements, block)


def sum_partials(partials: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic device-side sum of per-program partials, shaped like ``like`` (else (1,)), cast to ``dtype``."""
    total = partials.sum(dtype=partials.dtype).to(dtype)
    return total.reshape(like.shape if like is not None else (1,))


@triton.jit
def wide_scalar(hi, mid, lo, DTYPE: tl.constexpr):
    """A scalar passed as ``split_scalar`` parts, in ``DTYPE`` (fp64 rebuilds the exact double)."""
    if DTYPE == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, DTYPE)


@triton.jit
def sign_of(v, DTYPE: tl.constexpr):
    """``torch.sign(v)`` in ``DTYPE``: -1, 0 or 1 (0 for 0 and -0)."""
    one = tl.full(v.shape, 1.0, DTYPE)
    zero = tl.zeros(v.shape, DTYPE)
    return tl.where(v > 0, one, tl.where(v < 0, -one, zero))


@triton.jit
def clamp(v, lo, hi):
    """``torch.clamp(v, lo, hi)``: NaN propagates, the bounds are inclusive."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def inside(v, lo, hi, BOUND_PASSES: tl.constexpr):
    """Where ``clamp(v, lo, hi)`` passes its gradient: ``lo <= v <= hi``, or ``lo < v < hi`` if not BOUND_PASSES."""
    if BOUND_PASSES:
        return (v >= lo) & (v <= hi)
    else:
        return (v > lo) & (v < hi)
