"""Data builders and the tolerance rule shared by the op tests.

Tolerance rule (flash-attention's): forward outputs and elementwise gradients must equal the
reference bit for bit in every dtype (the kernels round where the reference does, and are given the
same ``g``). Step-size gradients are sums: ours accumulates in fp32 (fp64), the reference in the data's
dtype, so both are compared with an fp64 reference computed on the same (upcast) inputs, and ours
must satisfy ``|ours - ref64| <= 2 * max(|ref_same_dtype - ref64|, u_data * sum(|terms|)) + atol`` with
``atol = 8 * sqrt(n) * u_acc * sum(|terms|)`` (the random-walk bound of an n-term sum in
accumulation precision u_acc, with headroom 8). The floor ``u_data * sum(|terms|)`` is the error the
same-dtype reference is entitled to (its result is rounded to the data dtype, unit roundoff u_data):
without it a same-dtype result that rounds close to the truth by chance would demand more of us than
the dtype allows (hypothesis found such a bf16 case: the clamp masks of the rounded sums flip terms).
"""

from __future__ import annotations

import math

import torch

from apart_fast.ops import dispatch

BACKENDS_CPU: list[str] = ["torch"] + (["cpp"] if dispatch.available("cpp") else [])
FUSED_CPU: list[str] = [b for b in BACKENDS_CPU if b != "torch"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Sizes of 1, 1023 and 4100 elements (batch 1 for the first two).
SHAPES = [(1, 1, 1, 1), (1, 3, 11, 31), (4, 1, 25, 41)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape, dtype: torch.dtype, seed: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Uniform in [lo, hi), drawn in fp64 then rounded to dtype (same values whatever the dtype's RNG)."""
    u = torch.rand(shape, generator=gen(seed), dtype=torch.float64)
    return (lo + (hi - lo) * u).to(dtype)


def randn(shape, dtype: torch.dtype, seed: int, zeros: float = 0.05) -> torch.Tensor:
    """Normal values with a fraction of exact zeros (sign(0) = 0 must match too)."""
    v = torch.randn(shape, generator=gen(seed), dtype=torch.float64)
    v[torch.rand(shape, generator=gen(seed + 1)) < zeros] = 0.0
    return v.to(dtype)


def grid(shape, dtype: torch.dtype, seed: int, values: list[float]) -> torch.Tensor:
    """Entries drawn from ``values`` (dyadic numbers, exact in every dtype): puts elements exactly on bounds."""
    idx = torch.randint(len(values), shape, generator=gen(seed))
    return torch.tensor(values, dtype=torch.float64)[idx].to(dtype)


def data_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of a storage dtype."""
    return {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]


def acc_unit(dtype: torch.dtype) -> float:
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def assert_reduction(ours: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, n: int, abs_sum: float,
                     dtype: torch.dtype) -> None:
    """The flash-attention rule for a step-size gradient (see the module docstring)."""
    atol = 8.0 * math.sqrt(max(n, 1)) * acc_unit(dtype) * abs_sum + 1e-30
    err = (ours.double() - ref64.double()).abs().max().item()
    ref_err = max((ref_same.double() - ref64.double()).abs().max().item(), data_unit(dtype) * abs_sum)
    assert err <= 2.0 * ref_err + atol, f"step-size gradient error {err:.3e} > 2 * {ref_err:.3e} + {atol:.3e}"


def assert_exact(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{what}: {ours.dtype}{tuple(ours.shape)} vs " \
        f"{ref.dtype}{tuple(ref.shape)}"
    bad = ~((ours == ref) | (ours.isnan() & ref.isnan()))
    assert not bad.any(), f"{what}: {int(bad.sum())} of {ours.numel()} elements differ, e.g. {ours[bad][:4].tolist()} " \
        f"vs {ref[bad][:4].tolist()}"
