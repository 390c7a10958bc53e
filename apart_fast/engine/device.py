"""Where a run computes: ``--device`` resolved to a torch.device (refused with one line when it cannot be used), the
perturbation-op backend launched there once, and the device named in words for the log and results.json."""

from __future__ import annotations

import torch

from apart_fast.config import ConfigError
from apart_fast.engine.faults import is_out_of_memory


def auto_device(name: str) -> str:
    """``auto`` as ``cuda`` when a CUDA device is available, else ``cpu``; any other name unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_device(name: str) -> torch.device:
    """``name`` (``auto`` included) as a torch.device, refusing CUDA when none is available; ``cuda:N`` also
    becomes the current CUDA device, since graph capture, the current stream and Triton launches all use it."""
    name = auto_device(name)
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: apart_fast trains and evaluates on cpu or cuda devices only; pass --device "
                          "auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None:
        n = torch.cuda.device_count()
        if dev.index >= n:
            raise ConfigError(f"--device {name}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
        torch.cuda.set_device(dev)
    return dev


def check_backend(backend: str, device: torch.device) -> None:
    """ConfigError unless the perturbation-op backend ``backend`` loads and launches on ``device``: one tiny kernel
    (``pack_sign``) runs and is checked, so a backend that loads but cannot launch there (Triton on a CPU without
    its interpreter) fails before anything is written, not mid-run."""
    from apart_fast import ops

    try:
        signs = ops.pack_sign(torch.tensor([-2.0, 0.0, 3.0], device=device), backend=backend).cpu()
        if not torch.equal(signs, torch.tensor([-1, 0, 1], dtype=torch.int8)):
            raise RuntimeError(f"its sign kernel returned {signs.tolist()} for the signs of [-2, 0, 3]")
    except Exception as err:  # the launch's own error: "0 active drivers", a missing GPU architecture, ...
        if is_out_of_memory(err):
            raise
        why = " ".join(str(err).split())[:300]
        if backend == "triton" and device.type == "cpu":
            why += " (Triton runs CPU tensors only with TRITON_INTERPRET=1 set before the process starts)"
        raise ConfigError(f"--backend {backend} cannot run on {device}: {why}; pass --backend auto or torch") from None


def device_name(dev: torch.device) -> str:
    """What the run trained on, in words (for the log and results.json)."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
