"""Suite-wide set-up: one torch thread per test, and Triton under its CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports a kernel.
"""

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test runs single-threaded: bit-identical comparisons need a fixed thread count, and on a
    shared 2-core machine torch's intra-op threads spin against other processes (tiny convolutions
    get many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _no_runs_left_in_the_working_folder() -> Iterator[None]:
    """A CLI train without --out writes runs/<method>-<dataset>-<date-time>/ into the working folder (the
    repository): fail the session if a test did, so every test passes --out DIR or --out none."""
    runs, start = Path.cwd() / "runs", time.time() - 1

    def made() -> list[str]:
        return sorted(p.name for p in runs.glob("*-*-*") if re.search(r"-\d{8}-\d{6}(-\d+)?$", p.name)
                      and p.stat().st_mtime >= start) if runs.is_dir() else []

    yield
    assert not made(), f"tests wrote {runs}/{made()}: pass --out DIR (a tmp_path) or --out none"
