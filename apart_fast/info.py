"""``python -m apart_fast.info``: versions, CUDA availability, which op backends load (and why not), what auto picks."""

from __future__ import annotations

import os
import platform


def report() -> str:
    """The report as text (queries CUDA, so call it only when the report is wanted)."""
    import torch

    from apart_fast.ops import dispatch

    lines = [f"python {platform.python_version()}  torch {torch.__version__} (CUDA build {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as err:  # report, never fail
        lines.append(f"triton: not importable ({type(err).__name__}: {err})")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    lines.append("op backends:")
    lines.append("  torch : available (the reference, apart_fast/ops/reference.py)")
    for name in ("cpp", "cuda", "triton"):
        why = dispatch.unavailable_reason(name)
        state = "available" if not why else f"unavailable: {why}"
        if not why and name in ("cpp", "cuda"):
            mod = dispatch.module(name)
            state += f" ({mod.__file__}; clamp gradient passes at a bound: {mod.clamp_grad_passes_at_bound()})"
        lines.append(f"  {name:<6}: {state}")
    from apart_fast.ops import functions

    lines.append(f"torch.library custom ops (used under torch.compile): {', '.join(functions.CUSTOM_OPS)}")
    override = os.environ.get(dispatch.ENV_VAR, "")
    lines.append(f"{dispatch.ENV_VAR}={override!r}" + (" (overrides auto)" if override else " (unset)"))
    lines.append(f"auto picks: CPU tensors -> {dispatch.auto_backend(torch.device('cpu'))}, "
                 f"CUDA tensors -> {dispatch.auto_backend(torch.device('cuda'))}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
