"""Benchmark fixtures: the device, the machine's copy bandwidth (measured once per session) and versions."""

from __future__ import annotations

import os
import time

import pytest
import torch

# Threads for CPU runs: APART_BENCH_THREADS (default: torch's). On a shared, oversubscribed machine
# use 1: OpenMP barriers then do not wait on descheduled threads, and providers compare fairly.
if os.environ.get("APART_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["APART_BENCH_THREADS"]))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return _device()


@pytest.fixture(scope="session")
def copy_gbps(device: torch.device) -> float:
    """Achieved bandwidth of a large ``Tensor.copy_`` (bytes read + written per second, GB/s): the roof."""
    n = 1 << 26  # 256 MiB of fp32
    src, dst = torch.rand(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    gbps = 2 * 4 * n / best / 1e9
    print(f"\ncopy bandwidth on {device}: {gbps:.1f} GB/s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return gbps


@pytest.fixture(scope="session")
def versions(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "device": str(device), "threads": str(torch.get_num_threads())}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # recorded as absent
        info["triton"] = "absent"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
