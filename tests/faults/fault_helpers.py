"""Helpers of the fault-injection suite (a module, not conftest.py: test folders share that name):
tiny data made here, the CLI called in-process or in a process of its own that is killed at a chosen step,
faults injected into a step, and a sha256 of every file of a folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apart_fast.cli import main
from apart_fast.methods.clean import Clean


def make_image_folder(root: Path, n_train: int = 32, n_test: int = 8, size: int = 8, classes: int = 2) -> Path:
    """A tiny ImageFolder tree (train/ and test/, ``classes`` classes of size x size RGB PNGs)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.full((size, size, 3), 40 + 170 * (c % 2), dtype=np.int64) + rng.integers(0, 40, (size, size, 3))
                Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def tiny_flags(data: Path) -> list[str]:
    """A one-epoch clean run on ``data``: 64 training images (no validation slice), batch 16 -> 4 steps, a
    4-channel SmallCNN."""
    return ["--method", "clean", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "smallcnn", "--width",
            "4", "--batch-size", "16", "--epochs", "1", "--eval-n", "0", "--eval-steps", "1", "--final-eval-steps", "0",
            "--no-progress", "--log-interval", "2"]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path ({} when it does not exist)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``apart_fast.cli.main(argv)`` in-process: its exit code and its stderr."""
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def assert_one_line(err: str, *needles: str, prefix: str = "apart-fast: error: ") -> None:
    """``err`` is exactly one line, no traceback, starting with ``prefix`` and holding every needle."""
    lines = [line for line in err.splitlines() if not line.startswith("apart-fast: warning:")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def poison_step(monkeypatch: pytest.MonkeyPatch, at: int, poison) -> None:  # noqa: ANN001
    """Make ``poison(method, step)`` act on Clean's global step ``at`` (1-based); ``step()`` runs the method's own."""
    orig, calls = Clean.step, {"n": 0}

    def step(self, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] != at:
            return orig(self, batch)
        return poison(self, lambda: orig(self, batch))

    monkeypatch.setattr(Clean, "step", step)


_KILLED = textwrap.dedent("""
    import os, signal, sys
    from apart_fast.cli import main
    from apart_fast.methods.clean import Clean
    orig, calls = Clean.step, [0]
    def step(self, batch):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, batch)
    Clean.step = step
    sys.exit(main(sys.argv[2:]))
""")


def killed_at_step(argv: list[str], step: int) -> subprocess.CompletedProcess:
    """``apart-fast ARGV`` in a process of its own, killed with SIGKILL (kill -9) inside Clean's step ``step``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _KILLED, str(step), *argv], env=env, capture_output=True, text=True,
                          timeout=300)
