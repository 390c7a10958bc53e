"""Engine tests run without the epoch probe (speed); tests/conftest.py makes them single-threaded."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APART_FAST_PROBE", "0")
