"""The fault-injection suite's fixtures: a private data cache per test, the tiny data and one finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fault_helpers import make_image_folder, tiny_flags

from apart_fast.cli import main


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No epoch probe (speed) and a private data cache per test."""
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    monkeypatch.setenv("APART_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny image folder (read-only by convention: tests that change data make their own)."""
    return make_image_folder(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A finished one-epoch run (copy it before changing it: see ``run_copy``)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("APART_FAST_PROBE", "0")
            mp.setenv("APART_FAST_CACHE", str(out.parent / "cache"))
            assert main(["train", *tiny_flags(tiny_data), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run"))
