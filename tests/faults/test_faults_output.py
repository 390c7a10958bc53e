"""The output folder and resume: no run is lost. A refused start leaves every file bit for bit; --overwrite
keeps the old run until the new one has a checkpoint; --resume compares against the checkpoint itself.
One case per line: add a row to a table."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_helpers import assert_one_line, make_image_folder, run_cli, snapshot, tiny_flags
from PIL import Image

from apart_fast.config import Config, ConfigError
from apart_fast.engine import loop, out_dir, run_folder
from apart_fast.methods.clean import Clean


def _a_file(tmp: Path) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f"


def _under_a_file(tmp: Path) -> Path:
    return _a_file(tmp) / "sub" / "run"


def _dangling_link(tmp: Path) -> Path:
    (tmp / "link").symlink_to(tmp / "nowhere")
    return tmp / "link" / "run"


# Output folders that cannot take a run: (builder of --out in a temp folder, needles of the error line).
BAD_OUT: list[tuple[Callable[[Path], Path], list[str]]] = [
    (_a_file, ["is a file; pass a folder"]),
    (_under_a_file, ["f is a file, not a folder"]),
    (_dangling_link, ["link is a symlink to nothing"]),
    (lambda tmp: Path("/proc/apart-fast-fault-test/run"), ["/proc/apart-fast-fault-test/run is not writable", "in /proc"]),
]


@pytest.mark.parametrize(("build", "needles"), BAD_OUT, ids=["file", "under_file", "dangling_link", "proc"])
def test_unusable_out_exits_2_and_changes_nothing(build, needles, tiny_data, tmp_path, capsys):
    out = build(tmp_path)
    if str(out).startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    before = snapshot(tmp_path)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)
    assert rc == 2
    assert_one_line(err, *needles)
    assert snapshot(tmp_path) == before


def test_no_free_space_for_a_checkpoint_exits_2(tiny_data, run_copy, monkeypatch, capsys):
    before = snapshot(run_copy)
    monkeypatch.setattr(out_dir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(run_copy), "--overwrite"], capsys)
    assert rc == 2
    assert_one_line(err, "0.0 MiB free on its disk", "free some space")
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_run_and_drops_the_backup(tiny_data, run_copy, capsys):
    old = snapshot(run_copy)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(run_copy), "--overwrite", "--seed", "1"], capsys)
    assert rc == 0, err
    assert not (run_copy / run_folder.BACKUP).exists()
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 1
    assert snapshot(run_copy)["checkpoint.pt"] != old["checkpoint.pt"]


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(tiny_data, run_copy, monkeypatch,
                                                                                 capsys):
    before = snapshot(run_copy)

    def out_of_memory(self, batch):  # noqa: ANN001, ANN202
        raise MemoryError("tried to allocate 9 EiB")

    monkeypatch.setattr(Clean, "step", out_of_memory)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(run_copy), "--overwrite"], capsys)
    assert rc == 1
    assert_one_line(err, "the run failed at step 0", "MemoryError", "no checkpoint was written",
                    f"the run --overwrite would have replaced is back in {run_copy}")
    assert snapshot(run_copy) == before


def test_demo_refuses_an_occupied_out_without_overwrite(finished, tmp_path, capsys):
    shutil.copytree(finished, tmp_path / "demo" / "pgd")
    before = snapshot(tmp_path / "demo")
    rc, err = run_cli(["demo", "--methods", "clean,pgd", "--epochs", "1", "--out", str(tmp_path / "demo")], capsys)
    assert rc == 2
    assert_one_line(err, f"--out {tmp_path / 'demo' / 'pgd'} already holds a run", "--overwrite")
    assert snapshot(tmp_path / "demo") == before


def _drop_config_json(run: Path) -> None:
    (run / "config.json").unlink()


def _break_config_json(run: Path) -> None:
    (run / "config.json").write_text("{not json")


def _keep(run: Path) -> None:
    pass


# Resumes refused against the checkpoint's own config: (change to the run folder, flags, needles).
RESUME_REFUSED = [
    (_keep, ["--out", "{other}"], ["differs from --resume", "drop --out"]),
    (_drop_config_json, ["--method", "pgd"], ["--method pgd differs from the run", "(clean)", "--max-faults"]),
    (_break_config_json, ["--batch-size", "8"], ["--batch-size 8 differs from the run", "(16)"]),
    (_keep, ["--model", "preact18"], ["--model preact18 differs from the run"]),
    (_keep, ["--apart-lr", "0.1"], ["--apart-lr 0.1 differs from the run"]),
]


@pytest.mark.parametrize(("prep", "flags", "needles"), RESUME_REFUSED)
def test_resume_refused_leaves_the_run_bit_identical(prep, flags, needles, run_copy, tmp_path, capsys):
    prep(run_copy)
    other = tmp_path / "other"
    before = snapshot(run_copy)
    rc, err = run_cli(["train", "--resume", str(run_copy), *[f.format(other=other) for f in flags]], capsys)
    assert rc == 2
    assert_one_line(err, *needles)
    assert snapshot(run_copy) == before and not other.exists()


# Resumes that may change operational settings: (change to the run folder, flags, config.json values after).
RESUME_ALLOWED = [
    (_break_config_json, ["--epochs", "2"], {"epochs": 2, "lr": 0.2}),
    (_drop_config_json, ["--epochs", "2", "--lr", "0.05", "--max-faults", "3", "--log-interval", "1", "--eval-every",
                         "2", "--backend", "torch", "--no-progress"],
     {"epochs": 2, "lr": 0.05, "max_faults": 3, "log_interval": 1, "eval_every": 2, "backend": "torch"}),
]


@pytest.mark.parametrize(("prep", "flags", "expected"), RESUME_ALLOWED)
def test_resume_may_change_operational_settings(prep, flags, expected, run_copy, capsys):
    prep(run_copy)
    rc, err = run_cli(["train", "--resume", str(run_copy), *flags], capsys)
    assert rc == 0, err
    saved = json.loads((run_copy / "config.json").read_text())
    assert {k: saved[k] for k in expected} == expected
    assert len([json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]) == 2


def test_resume_may_not_shrink_epochs():
    with pytest.raises(ConfigError, match="--epochs 3 is fewer than the 5 of the run in r"):
        loop.resume_config(Config(epochs=5), Config(epochs=3), {"epochs"}, "r")
    assert loop.resume_config(Config(epochs=5, lr=0.1), Config(epochs=7), None, "r").epochs == 7  # Python API


def test_resume_on_changed_data_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert run_cli(["train", *tiny_flags(data), "--out", str(run)], capsys)[0] == 0
    before = snapshot(run)
    img = data / "train" / "c0" / "0.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(img)  # same sizes, other pixels
    rc, err = run_cli(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert rc == 2
    assert_one_line(err, "the data differs", "same sizes, different images or labels", "start a new --out")
    for i in (90, 91):
        shutil.copy(img, data / "train" / "c1" / f"{i}.png")
    rc, err = run_cli(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert rc == 2
    assert_one_line(err, "the data differs", "training examples 64 -> 66")
    assert snapshot(run) == before


def test_resume_skips_lines_of_metrics_jsonl_that_are_no_record(run_copy, capsys):
    path = run_copy / "metrics.jsonl"
    junk = [b"", b"null", b"[1, 2]", b'"text"', b'{"epoch": "one"}', b'{"epoch": 1, "step": null, "x": 1}', b"\xff\xfe"]
    path.write_bytes(b"\n".join(junk[:4]) + b"\n" + path.read_bytes() + b"\n".join(junk[4:]) + b"\n")
    rc, err = run_cli(["train", "--resume", str(run_copy), "--epochs", "2"], capsys)
    assert rc == 0, err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (2, 8)]
