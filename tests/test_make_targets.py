"""The README's ``make test`` runs the main suite without its slow tests (no second torch download); ``make
test-all``, which CI runs through .ci/run, adds the slow tests and the GPU image's rehearsal (``make test-gpuimage``)."""

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
def test_make_test_is_the_main_suite_and_ci_adds_the_slow_tests_and_the_gpu_image_rehearsal():
    main, everything = _plan("test"), _plan("test-all")
    fast, slow = '-m "not slow and not gpuimage" tests', '-m "slow and not gpuimage" tests'
    assert fast in main and slow not in main and "requirements-gpuimage" not in main and ".venv-gpuimage" not in main
    assert fast in everything and slow in everything
    assert "pip install -q --no-deps -r requirements-gpuimage.txt" in everything
    assert "tests/bench/test_gpu_suite.py" in everything and "sm90_report.py" in everything
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line.startswith("make")] == ["make test-all"]
