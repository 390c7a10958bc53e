"""Where a benchmark ran: device, versions, CPU, threads, load and the command, recorded with every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def package_version(name: str) -> str | None:
    """Installed version of ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    """The command as the user typed it, as far as sys.argv tells."""
    argv = list(sys.argv)
    if not argv:
        return ""
    head = Path(argv[0]).name
    if head == "__main__.py":
        return shlex.join([Path(sys.executable).name, "-m", "apart_fast", *argv[1:]])
    if head in ("apart-fast", "apart_fast"):
        return shlex.join(["apart-fast", *argv[1:]])
    return shlex.join(argv)


def git_revision() -> str | None:
    """The repository's HEAD commit (with '+dirty' when the tree has changes), or None outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def nvml_info(device: torch.device) -> dict[str, Any]:
    """Name, memory clock (MHz), bus width (bits) and theoretical bandwidth of an NVIDIA GPU via nvidia-ml-py.

    Returns {"nvml_error": ...} when pynvml is missing or the query fails.
    """
    try:
        import pynvml
    except ImportError:
        return {"nvml_error": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
        try:
            handle = None
            props = torch.cuda.get_device_properties(device)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:
                pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
                try:
                    handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci)
                except pynvml.NVMLError:
                    handle = None
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            name = pynvml.nvmlDeviceGetName(handle)
            info: dict[str, Any] = {"nvml_name": name.decode() if isinstance(name, bytes) else name}
            info["driver"] = _decode(pynvml.nvmlSystemGetDriverVersion())
            info["mem_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
            info["mem_clock_now_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
            info["sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
            try:
                width = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
                info["bus_width_bits"] = width
                # double data rate: 2 transfers per memory clock
                info["theoretical_gbps"] = round(2 * info["mem_clock_mhz"] * 1e6 * width / 8 / 1e9, 1)
            except (pynvml.NVMLError, AttributeError) as err:
                info["bus_width_bits"] = None
                info["bus_width_error"] = str(err)
            return info
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # any NVML failure is reported, never fatal
        return {"nvml_error": f"{type(err).__name__}: {err}"}


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def device_name(device: torch.device) -> str:
    """A readable device name: the GPU's name, or 'CPU: <model>'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything worth saving beside a timing: device, versions, CPU, threads, load, command, commit."""
    device = torch.device(device)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": load,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "apart_fast_commit": git_revision(),
        "command": command_line(),
        "cwd": os.getcwd(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env.update(nvml_info(device))
    return env


def timestamp() -> str:
    """A folder-name-safe local timestamp."""
    return time.strftime("%Y%m%d-%H%M%S")
