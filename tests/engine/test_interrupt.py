"""Interruption loses nothing: SIGINT/SIGTERM checkpoint the current step and resume bit-identically,
kill -9 at random moments always leaves a readable checkpoint that --resume finishes from."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import ROOT, STEPS_PER_EPOCH, TINY, assert_same_run, run_state, signal_at, subprocess_env

from apart_fast.cli import main
from apart_fast.methods import Apart

EPOCHS = 6
ARGS = ["train", "--method", "apart", *TINY, "--epochs", str(EPOCHS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("APART_FAST_PROBE", "0")
            assert main([*ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def epoch_records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "event" not in r]


def test_sigint_mid_epoch_checkpoints_and_resumes_bit_identical(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    step = STEPS_PER_EPOCH + 7  # epoch 2, after its 7th step
    signal_at(monkeypatch, Apart, step, signal.SIGINT)
    assert main([*ARGS, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "interrupted by SIGINT" in err and f"resume with: apart-fast train --resume {out}" in err
    assert f"epoch 2, step 7/{STEPS_PER_EPOCH}" in err
    saved = run_state(out)
    assert (saved["epoch"], saved["step_in_epoch"], saved["step_count"]) == (1, 7, step)
    monkeypatch.undo()
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    assert main(["train", "--resume", str(out)]) == 0
    assert_same_run(reference, out)
    ref, got = epoch_records(reference), epoch_records(out)
    assert [r["epoch"] for r in got] == list(range(1, EPOCHS + 1))
    for a, b in zip(ref, got):  # the interrupted epoch's running sums were checkpointed too
        assert a["train_loss"] == b["train_loss"] and a["train_acc"] == b["train_acc"] and a["a_in"] == b["a_in"]


def test_sigterm_at_epoch_end_exits_143_and_resumes_bit_identical(reference, tmp_path, monkeypatch, capsys):
    """Also the exact-resume check at an epoch boundary: 1 epoch, stop, resume the other 5."""
    out = tmp_path / "run"
    signal_at(monkeypatch, Apart, STEPS_PER_EPOCH, signal.SIGTERM)  # the epoch's last step: the epoch completes
    assert main([*ARGS, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM" in err and "end of epoch 1" in err and "--resume" in err
    saved = run_state(out)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 0)
    monkeypatch.undo()
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    assert main(["train", "--resume", str(out)]) == 0
    assert_same_run(reference, out)
    assert (out / "results.json").exists()


def _wait_for_new_checkpoint(path: Path, proc: subprocess.Popen, before: tuple[int, int] | None,
                             timeout: float = 120.0) -> bool:
    """Wait until ``path`` is replaced by a newer file than ``before``; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            st = path.stat()
            if (st.st_ino, st.st_mtime_ns) != before:
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"no new {path} within {timeout}s")


def _stat(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def test_real_sigint_to_subprocess(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "apart_fast", *ARGS, "--out", str(out)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_new_checkpoint(out / "checkpoint.pt", proc, None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"resume with: apart-fast train --resume {out}" in err
    assert main(["train", "--resume", str(out)]) == 0
    assert_same_run(reference, out)


def test_kill9_at_random_moments_always_leaves_a_resumable_checkpoint(reference, tmp_path):
    rng = random.Random(7)
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    kills = 0
    for rep in range(3):
        cmd = [*ARGS, "--out", str(out)] if rep == 0 else ["train", "--resume", str(out)]
        before = _stat(ckpt)
        proc = subprocess.Popen([sys.executable, "-m", "apart_fast", *cmd], cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if _wait_for_new_checkpoint(ckpt, proc, before):
                time.sleep(rng.uniform(0.0, 0.4))  # anywhere in the next epoch, a checkpoint write included
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=120)
        finally:
            proc.kill()
        saved = run_state(out)  # verifies header, length and checksum
        assert saved["kind"] == "full" and 1 <= saved["epoch"] <= EPOCHS
    assert kills >= 2
    assert main(["train", "--resume", str(out)]) == 0
    assert_same_run(reference, out)
    assert [r["epoch"] for r in epoch_records(out)] == list(range(1, EPOCHS + 1))  # no duplicate or torn lines
    assert not list(out.glob(".*.tmp"))
