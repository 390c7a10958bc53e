"""Backends and fixtures of the op tests (helpers and the tolerance rule: ops_testutil.py).

``BACKENDS_CPU`` lists the available backends among torch/cpp that run CPU tensors; the Triton tests
(test_triton*.py) may append "triton" here when they run it on CPU tensors under TRITON_INTERPRET=1.
The ``backend`` fixture runs a test once per entry; ``fused`` once per compiled CPU backend.
"""

from __future__ import annotations

import pytest

from apart_fast.ops import dispatch

BACKENDS_CPU: list[str] = ["torch"] + (["cpp"] if dispatch.available("cpp") else [])
FUSED_CPU: list[str] = [b for b in BACKENDS_CPU if b != "torch"]


@pytest.fixture(params=BACKENDS_CPU)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=FUSED_CPU or [pytest.param("cpp", marks=pytest.mark.skip(reason="cpp extension not built"))])
def fused(request: pytest.FixtureRequest) -> str:
    return request.param
