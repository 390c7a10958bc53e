"""Backend selection and input checks for the fused perturbation ops.

Backends: ``"torch"`` (the reference in ``reference.py``, differentiated by autograd), ``"cpp"``
(``apart_fast._C_cpu``, CPU tensors), ``"cuda"`` (``apart_fast._C_cuda``, CUDA tensors) and ``"triton"``
(``apart_fast.kernels``, CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1`` when asked for
explicitly). Each compiled/Triton backend is a module exposing the same raw primitives
(``PRIMITIVES``). ``"auto"`` picks, for CUDA tensors, cuda > triton > torch and, for CPU tensors,
cpp > torch; the environment variable ``APART_FAST_BACKEND`` replaces ``"auto"`` by a fixed name.

Availability is probed once per process (``functools.cache``) and only on first use: importing
this module touches neither the extensions nor ``torch.cuda``. A backend that failed to load keeps
its error, which is raised (with the fix) only when that backend is asked for.

Layout: the compiled/Triton backends run the elementwise ops over memory order, so they take dense
tensors in any memory format (NCHW, channels_last, any permutation) as long as the tensors of one op
share it, and allocate their outputs with ``empty_like`` (same layout). ``dense`` and ``like`` below
give the arguments of one op that shared layout: nothing is copied when they already have it (the
channels_last activations of a channels_last model stay channels_last); a strided view (``t[::2]``)
or an argument in another layout than the op's first tensor costs one copy.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "APART_FAST_BACKEND"
PRIMITIVES = (
    "perturb_init_fwd",
    "perturb_init_bwd",
    "sign_step_fwd",
    "sign_step_bwd",
    "pack_sign",
    "layer_perturb_fwd",
    "layer_perturb_bwd",
    "omega_gather",
    "omega_update",
    "pgd_step",
)
_MODULES = {"cpp": "apart_fast._C_cpu", "cuda": "apart_fast._C_cuda", "triton": "apart_fast.kernels"}
REBUILD = "CUDA_HOME=/usr/local/cuda .venv/bin/python -m pip install --no-build-isolation --no-deps -e ."
_HINTS = {
    "cpp": f"rebuild the extension: {REBUILD}",
    "cuda": f"install the CUDA toolkit (nvcc), unset APART_FAST_NO_CUDA and rebuild: {REBUILD}",
    "triton": "install triton (pip install triton) and make sure the kernels/ folder is installed as apart_fast.kernels",
}


@functools.cache
def load(name: str) -> tuple[ModuleType | None, str]:
    """The backend's primitive module and ``""``, or ``None`` and why it is unavailable (probed once)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as err:  # keep any load failure (missing .so, undefined symbol, no triton) for later
        return None, f"import {_MODULES[name]} failed: {type(err).__name__}: {err}"
    missing = [p for p in PRIMITIVES if not hasattr(mod, p)]
    if missing:
        return None, f"{_MODULES[name]} lacks the primitives {', '.join(missing)}"
    return mod, ""


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant, never traces the import
def available(name: str) -> bool:
    """Whether the backend loads (``"torch"`` always does)."""
    return name == "torch" or load(name)[0] is not None


def unavailable_reason(name: str) -> str:
    """Why a backend is unavailable, with the fix; ``""`` when it is available."""
    if available(name):
        return ""
    return f"{load(name)[1]}; {_HINTS[name]}"


def auto_backend(device: torch.device) -> str:
    """What ``"auto"`` picks for tensors on ``device`` (ignores the environment override)."""
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if available(name):
                return name
        return "torch"
    if device.type == "cpu" and available("cpp"):
        return "cpp"
    return "torch"


def resolve(backend: str, device: torch.device) -> str:
    """The backend name to use for tensors on ``device``; raises RuntimeError when it cannot run them."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        if backend == "auto":
            return auto_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend == "torch":
        return backend
    if not available(backend):
        raise RuntimeError(f"backend {backend!r} is unavailable: {unavailable_reason(backend)}")
    if backend == "cpp" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpp' runs CPU tensors but got {device} tensors; use backend='cuda' or 'auto'")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' runs CUDA tensors but got {device} tensors; use backend='cpp' or 'auto'")
    return backend


def module(name: str) -> ModuleType:
    """The primitive module of an available, non-torch backend."""
    mod, _ = load(name)
    assert mod is not None, name
    return mod


# ---- memory layout ----

def is_dense(t: Tensor) -> bool:
    """Whether ``t`` is non-overlapping and dense in some memory format (its elements fill ``numel`` slots)."""
    expected = 1
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) != 1):
        if stride != expected:
            return t.numel() == 0
        expected *= size
    return True


def same_layout(t: Tensor, ref: Tensor) -> bool:
    """Whether ``t`` has ``ref``'s shape and strides (strides of size-1 dimensions never matter)."""
    return t.shape == ref.shape and all(t.stride(d) == ref.stride(d) for d in range(t.dim()) if t.size(d) != 1)


def dense(t: Tensor) -> Tensor:
    """``t`` itself when dense (any memory format), else one dense copy in the memory format it suggests."""
    return t if is_dense(t) else torch.empty_like(t).copy_(t)


def like(ref: Tensor, t: Tensor) -> Tensor:
    """``t`` laid out like the dense ``ref``: itself when it already is, else one copy in ``ref``'s layout."""
    return t if same_layout(t, ref) else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def shared_layout(first: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
    """The tensors of one elementwise op in one dense layout: ``first``'s (made dense if needed)."""
    ref = dense(first)
    return (ref, *(like(ref, t) for t in rest))


# ---- input checks (one-line errors naming the value and the fix) ----

_DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_data(op: str, backend: str, **tensors: Tensor) -> None:
    """Same device, same dtype, same number of elements; a supported float dtype."""
    (ref_name, ref), *rest = tensors.items()
    if not isinstance(ref, Tensor):
        raise TypeError(f"{op}: {ref_name} must be a tensor, got {type(ref).__name__}")
    if ref.dtype not in _DATA_DTYPES:
        raise TypeError(f"{op}: {ref_name} has dtype {ref.dtype}; use float32, float16, bfloat16 or float64")
    if ref.dtype == torch.float64 and backend in ("cuda", "triton"):
        raise TypeError(f"{op}: float64 runs on backends 'torch' and 'cpp' only; cast {ref_name} to float32")
    for name, t in rest:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move {name} there")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            f"cast it with {name}.to({ref_name}.dtype)")
        if t.shape != ref.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; "
                             "pass tensors of one shape")


def check_step(op: str, name: str, a: Tensor, like: Tensor) -> None:
    """A step size: a one-element float32/float64 tensor on the data's device."""
    if not isinstance(a, Tensor):
        raise TypeError(f"{op}: {name} must be a one-element tensor, got {type(a).__name__}; wrap it with torch.tensor")
    if a.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one element, got shape {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} has dtype {a.dtype}; step sizes are float32 (or float64) tensors")
    if a.device != like.device:
        raise ValueError(f"{op}: {name} is on {a.device} but the data is on {like.device}; move {name} there")


def check_eps(op: str, eps: float) -> float:
    """eps as a Python float in (0, 1]."""
    if isinstance(eps, Tensor) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a Python float, got {type(eps).__name__}")
    if not 0.0 < float(eps) <= 1.0:
        raise ValueError(f"{op}: eps={eps} is not in (0, 1]; pass the L-inf budget in [0,1] image units, e.g. 8/255")
    return float(eps)
