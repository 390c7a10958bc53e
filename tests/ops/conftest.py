"""Fixtures of the op tests (helpers, backend lists and the tolerance rule: ops_testutil.py).

``BACKENDS_CPU`` (in ops_testutil, importable by name: every test folder has its own conftest) lists
the available backends among torch/cpp that run CPU tensors; the Triton tests
(test_triton*.py) may append "triton" here when they run it on CPU tensors under TRITON_INTERPRET=1.
The ``backend`` fixture runs a test once per entry; ``fused`` once per compiled CPU backend.
"""

from __future__ import annotations

import pytest
from ops_testutil import BACKENDS_CPU, FUSED_CPU


@pytest.fixture(params=BACKENDS_CPU)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=FUSED_CPU or [pytest.param("cpp", marks=pytest.mark.skip(reason="cpp extension not built"))])
def fused(request: pytest.FixtureRequest) -> str:
    return request.param
