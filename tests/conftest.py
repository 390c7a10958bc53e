"""Suite-wide set-up: one torch thread per test, and Triton under its CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports a kernel.
"""

import os
from collections.abc import Iterator

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
