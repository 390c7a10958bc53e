"""The README's ``make test`` runs the main suite only (no second torch download); ``make test-all``, which
CI runs through .ci/run, adds the GPU image's rehearsal (``make test-gpuimage``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _plan(target: str) -> str:
    """The commands ``make TARGET`` would run from scratch (``make -n -B``: printed, none run; every target out of date)."""
    res = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_is_the_main_suite_and_ci_adds_the_gpu_image_rehearsal():
    main, everything = _plan("test"), _plan("test-all")
    assert "-m pytest -q tests" in main and "gpuimage" not in main and "requirements-gpuimage" not in main
    assert "-m pytest -q tests" in everything and "pip install -q --no-deps -r requirements-gpuimage.txt" in everything
    assert "gpu_suite.sh --dry-run" in everything
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line.startswith("make")] == ["make test-all"]
