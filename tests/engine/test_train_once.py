"""train_once: a finished run is returned without training, an interrupted one resumes from its checkpoint with
that checkpoint's config, anything else (no folder, a file that is not a run checkpoint) starts afresh."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apart_fast.config import Config, ConfigError
from apart_fast.engine import loop

FORMAT1_RUN = Path(__file__).parent / "format1_run"


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_train(cfg, *, resume=False, overwrite=False, progress=True, changed=None):
        seen.append({"out": cfg.out, "resume": resume, "overwrite": overwrite, "changed": changed})
        return {"trained": True}

    monkeypatch.setattr(loop, "train", fake_train)
    return seen


def test_finished_run_is_returned_without_training(tmp_path, calls):
    (tmp_path / "results.json").write_text(json.dumps({"test_clean_acc": 0.5}))
    shutil.copy(FORMAT1_RUN / "checkpoint.pt", tmp_path / "checkpoint.pt")  # results.json wins over a checkpoint
    assert loop.train_once(Config(out=str(tmp_path))) == {"test_clean_acc": 0.5}
    assert calls == []


def test_interrupted_run_resumes_with_its_own_config(tmp_path, calls):
    shutil.copy(FORMAT1_RUN / "checkpoint.pt", tmp_path / "checkpoint.pt")
    assert loop.train_once(Config(out=str(tmp_path), epochs=99)) == {"trained": True}
    assert calls == [{"out": str(tmp_path), "resume": True, "overwrite": False, "changed": set()}]


@pytest.mark.parametrize("leftover", [None, b"", b"not a checkpoint"])
def test_anything_else_starts_afresh(tmp_path, calls, leftover):
    out = tmp_path / "run"
    if leftover is not None:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(leftover)
    loop.train_once(Config(out=str(out)))
    assert calls == [{"out": str(out), "resume": False, "overwrite": True, "changed": None}]


def test_needs_an_output_folder(calls):
    with pytest.raises(ConfigError, match="train_once needs cfg.out"):
        loop.train_once(Config(out=None))
    assert calls == []
