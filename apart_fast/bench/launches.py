"""Kernel launches per training step, counted with torch.profiler, so a launch-count regression shows
in a table rather than in a GPU lease.

On the CPU a launch is a *leaf* aten call: not a view/metadata/allocation op, and calling no aten op
that is not one either (``where`` allocating its output is a leaf; ``clone`` calling ``copy_`` is not,
its ``copy_`` is). Each leaf runs one kernel (a loop over the data); an op that fills its output
before its own loop (``sum``) counts once, so the count is a floor, stable across runs. On CUDA it is
every kernel, memcpy and memset the device ran (CUDA-graph replays included, as CUPTI reports them).
``by_source`` attributes each CPU launch to the innermost ``apart_fast`` frame of its Python stack,
which is how the step-primitive benchmark (``benchmarks/step_launches.py``) isolates the fault
guard, the optimizers and the schedules from the forward and backward passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# aten ops that launch no kernel: views, metadata, allocation without fill.
NO_KERNEL = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand",
    "aten::expand_as", "aten::permute", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::select",
    "aten::slice", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::chunk", "aten::detach",
    "aten::detach_", "aten::alias", "aten::lift_fresh", "aten::view_as", "aten::flatten", "aten::unflatten",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::set_", "aten::_nested_tensor_from_mask",
    "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::size", "aten::stride",
    "aten::resolve_conj", "aten::resolve_neg", "aten::conj", "aten::_conj", "aten::contiguous", "aten::numpy_T",
    "aten::to", "aten::_to_copy", "aten::type_as", "aten::requires_grad_", "aten::retain_grad", "aten::zeros_like",
})


def _is_launch(evt: Any) -> bool:
    """A CPU-side aten op that does its work itself: not view/metadata/allocation, and no callee that does work."""
    if not evt.name.startswith("aten::") or evt.name in NO_KERNEL:
        return False
    return not any(c.name.startswith("aten::") and c.name not in NO_KERNEL for c in evt.cpu_children)


def _source(evt: Any) -> str:
    """``<file>:<function>`` (relative to apart_fast/) of the innermost apart_fast Python frame that issued
    ``evt``, from the profiler's Python-function events above it ('other' if none)."""
    parent = evt.cpu_parent
    while parent is not None:
        if "apart_fast/" in parent.name:
            where, _, func = parent.name.rpartition(": ")
            return f"{where.split('apart_fast/', 1)[1].split('(')[0]}:{func}"
        parent = parent.cpu_parent
    return "other"


def count_launches(fn: Callable[[], Any], device: torch.device, stacks: bool = False) -> dict[str, Any]:
    """Run ``fn`` once under the profiler; the launches it issued: ``total``, ``by_op`` and, with
    ``stacks`` (CPU only), ``by_source`` (see the module docstring); ``kind`` names what was counted."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities, with_stack=stacks and not cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = list(prof.events())
    if cuda:
        launched = [e for e in events if e.device_type == DeviceType.CUDA]
        return {"kind": "CUDA kernels, memcpys and memsets", "total": len(launched),
                "by_op": dict(Counter(e.name for e in launched).most_common())}
    launched = [e for e in events if _is_launch(e)]
    out: dict[str, Any] = {"kind": "kernel-launching leaf aten calls (CPU)", "total": len(launched),
                           "by_op": dict(Counter(e.name for e in launched).most_common())}
    if stacks:
        out["by_source"] = dict(Counter(_source(e) for e in launched).most_common())
    return out
