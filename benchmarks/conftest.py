"""Benchmark fixtures: the device, the machine's copy bandwidth (measured once per session) and versions."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

# Threads for CPU runs: APART_BENCH_THREADS (default: torch's). On a shared, oversubscribed machine
# use 1: OpenMP barriers then do not wait on descheduled threads, and providers compare fairly.
if os.environ.get("APART_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["APART_BENCH_THREADS"]))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return _device()


def time_calls(fn: Callable[[], object], device: torch.device, rep_ms: float = 50.0) -> dict[str, object]:
    """Seconds per call of ``fn``, timed call by call over many back-to-back calls: min, q1, median, q3, max.

    CUDA: CUDA events around each call (``triton.testing.do_bench``, L2 flushed before each), so neither
    launch nor Python overhead hides a kernel that the GPU runs behind the host. CPU: ``perf_counter``.
    """
    qs = (0.0, 0.25, 0.5, 0.75, 1.0)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=max(1, int(rep_ms / 5)), rep=int(rep_ms), quantiles=list(qs))
        t = [v / 1e3 for v in ms]
        timer, calls = "CUDA events per call (triton.testing.do_bench, L2 flushed)", None
    else:
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < rep_ms / 1e3 and len(times) < 200):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(qs, dtype=torch.float64)).tolist()
        timer, calls = "perf_counter per call", len(times)
    return dict(zip(("min", "q1", "median", "q3", "max"), t), iqr=t[3] - t[1], timer=timer, rounds=calls)


@pytest.fixture(scope="session")
def timer(device: torch.device) -> Callable[[Callable[[], object]], dict[str, object]]:
    """``time_calls`` on the session's device."""
    return lambda fn: time_calls(fn, device)


@pytest.fixture(scope="session")
def copy_gbps(device: torch.device) -> float:
    """Bandwidth of a large ``Tensor.copy_`` (bytes read + written per second, GB/s), timed as the ops are: the roof."""
    n = (1 << 26) if device.type == "cuda" else (1 << 24)  # 256 MiB of fp32 (64 MiB on the CPU)
    src, dst = torch.rand(n, device=device), torch.empty(n, device=device)
    gbps = 2 * 4 * n / float(time_calls(lambda: dst.copy_(src), device)["median"]) / 1e9
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
