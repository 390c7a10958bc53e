"""Peak memory of a region of a benchmark: the CUDA allocator's peak, or the process's peak resident set on the CPU
(VmHWM, reset through /proc/self/clear_refs), each less what was in use when the region started."""

from __future__ import annotations

import gc
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of a region: CUDA allocator peak, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = ("torch.cuda.max_memory_allocated" if self.cuda
                     else "process peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before")
        self.base = 0

    def start(self) -> None:
        """Begin the region: collect garbage, reset the peak and note what is in use now."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        malloc_trim()  # hand freed heap pages back, so reusing them shows up in the peak
        self.base = status_kb("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (Linux >= 4.0)
        except OSError:
            self.kind = "process peak RSS (ru_maxrss, never reset: a lower bound after a larger earlier method) minus RSS before"

    def peak(self) -> int:
        """Bytes at the region's peak above what was in use at ``start``."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return max(0, status_kb("VmHWM") * 1024 - self.base)


def malloc_trim() -> None:
    """glibc's malloc_trim(0): return free heap memory to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def status_kb(key: str) -> int:
    """A kB field of /proc/self/status (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return 0

