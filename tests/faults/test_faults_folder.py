"""One process per run folder, and a folder holds a run only once it holds a checkpoint: a second process is refused
naming the holder's pid, files no run wrote are never replaced, a failed or killed start leaves nothing the next
start does not recognise, an --overwrite keeps the old run until the new one has finished an epoch, and reproduce
refuses folders holding runs or results as train does. One case per line: add a row to a table."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_one_line, killed_at_step, poison_step, run_cli, snapshot, tiny_flags
from torch import nn

import apart_fast
from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.engine import checkpoint, loop, run_folder
from apart_fast.engine.run_folder import BACKUP, LOCK, FolderLock
from apart_fast.methods.clean import Clean

HOLD = ("import sys, time; from apart_fast.engine.run_folder import FolderLock\n"
        "for folder in sys.argv[1:]: FolderLock(folder).acquire()\n"
        "print('locked', flush=True); time.sleep(600)")


def test_a_second_process_is_refused_naming_the_holders_pid_and_kill_9_leaves_no_stale_lock(run_copy, tiny_data,
                                                                                               tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_copy), str(empty)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        for flag, folder, argv in (("--resume", run_copy, ["--resume", str(run_copy), "--epochs", "2"]),
                                   ("--out", run_copy, [*tiny_flags(tiny_data), "--out", str(run_copy), "--overwrite"]),
                                   ("--out", empty, [*tiny_flags(tiny_data), "--out", str(empty)])):
            rc, err = run_cli(["train", *argv], capsys)
            assert rc == 2
            assert_one_line(err, f"{flag} {folder} is in use by another apart-fast process (pid {holder.pid})",
                            f"kill {holder.pid}")
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()  # SIGKILL: the OS drops its locks
        holder.wait()
    rc, err = run_cli(["train", "--resume", str(run_copy), "--epochs", "2"], capsys)
    assert rc == 0, err
    assert checkpoint.load(run_copy / "checkpoint.pt")["step_count"] == 8


def test_a_run_holds_its_folder_from_creating_it_to_its_end(tiny_data, tmp_path, monkeypatch):
    out, seen = tmp_path / "new" / "run", []

    def try_to_lock(method, step):  # noqa: ANN001, ANN202
        with pytest.raises(ConfigError) as exc:
            FolderLock(out).acquire()
        seen.append(str(exc.value))
        return step()

    poison_step(monkeypatch, 2, try_to_lock)
    assert apart_fast.cli.main(["train", *tiny_flags(tiny_data), "--out", str(out)]) == 0
    assert seen and f"is in use by another apart-fast process (pid {os.getpid()})" in seen[0]
    assert not (out / LOCK).exists()
    lock = FolderLock(out)
    lock.acquire()
    lock.release()


def test_a_start_refused_at_its_folders_creation_leaves_the_holders_files_alone(tiny_data, tmp_path, monkeypatch,
                                                                                 capsys):
    out, other = tmp_path / "run", FolderLock(tmp_path / "run")

    def another_start(path, need, flag="--out"):  # noqa: ANN001, ANN202 - meanwhile another start takes the new folder
        out.mkdir()
        other.acquire()
        (out / run_folder.START).write_text("1\n")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loop, "check_free_space", another_start)
    try:
        rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)
        assert rc == 2
        assert_one_line(err, f"--out {out} is in use by another apart-fast process (pid {os.getpid()})")
        assert sorted(snapshot(out)) == sorted([LOCK, run_folder.START, "config.json"])
    finally:
        other.release()


def test_a_filesystem_without_locks_warns_and_trains(tiny_data, tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_folder.fcntl, "flock", no_locks)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    assert "apart-fast: warning: cannot lock" in err and "No locks available" in err


def _torch_save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# A user's files named like a run's, with no run of apart-fast beside them: (files, how the error line names them).
USER_FILES = [
    ({"config.json": b'{"mine": true}\n', "metrics.jsonl": b'{"epoch": 1}\n'}, "metrics.jsonl, config.json"),
    ({"model.pt": _torch_save({"weights": torch.ones(3)})}, "model.pt"),
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("files", "named"), USER_FILES, ids=["json", "torch_save"])
def test_files_no_run_wrote_are_never_replaced(files, named, overwrite, tiny_data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name, content in files.items():
        (out / name).write_bytes(content)
    before = snapshot(out)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out), *(["--overwrite"] * overwrite)], capsys)
    assert rc == 2
    assert_one_line(err, f"--out {out} holds {named} but no run of apart-fast wrote them", "move them away")
    assert snapshot(out) == before


def test_a_start_killed_before_its_first_checkpoint_is_resumed_or_started_again(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    killed = killed_at_step(["train", *tiny_flags(tiny_data), "--out", str(out)], 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()
    again = Path(shutil.copytree(out, tmp_path / "again"))
    rc, err = run_cli(["train", "--resume", str(out)], capsys)  # starts the run over with its config.json
    assert rc == 0, err
    assert "holds no checkpoint yet" in err and "starting that run over with the settings of its config.json" in err
    assert checkpoint.load(out / "checkpoint.pt")["step_count"] == 4
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(again), "--seed", "3"], capsys)
    assert rc == 0, err
    assert json.loads((again / "config.json").read_text())["seed"] == 3
    assert not (again / run_folder.START).exists()


def test_an_overwrite_killed_in_its_first_epoch_gives_the_old_run_back_on_the_next_command(tiny_data, run_copy,
                                                                                           tmp_path, capsys):
    before = snapshot(run_copy)
    killed = killed_at_step(["train", *tiny_flags(tiny_data), "--out", str(run_copy), "--overwrite", "--seed", "1"], 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run_copy / BACKUP / "checkpoint.pt").is_file() and not (run_copy / "checkpoint.pt").exists()
    other = Path(shutil.copytree(run_copy, tmp_path / "other"))
    rc, err = run_cli(["eval", "--checkpoint", str(other / "model.pt"), "--steps", "1"], capsys)
    assert rc == 2
    assert_one_line(err, "an interrupted --overwrite kept the run in", f"apart-fast train --resume {other}")
    rc, err = run_cli(["train", "--resume", str(run_copy), "--epochs", "2"], capsys)
    assert rc == 0, err
    assert "the run it was replacing (kept in overwritten-run/) is back in place" in err
    saved = checkpoint.load(run_copy / "checkpoint.pt")
    assert saved["step_count"] == 8 and saved["config"]["seed"] == 0
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(other)], capsys)  # the next command: a plain train
    assert rc == 2
    assert_one_line(err, f"--out {other} already holds a run (checkpoint.pt)")
    assert snapshot(other) == before


def test_an_overwrite_killed_after_its_first_epoch_checkpoint_drops_the_old_run(run_copy, tmp_path):
    old = Path(shutil.copytree(run_copy, tmp_path / "old"))
    shutil.copytree(old, run_copy / BACKUP)
    run_folder.recover(run_copy)
    assert not (run_copy / BACKUP).exists() and snapshot(run_copy) == snapshot(old)


def _interrupt(mp: pytest.MonkeyPatch) -> list[str]:
    poison_step(mp, 2, lambda method, step: (signal.raise_signal(signal.SIGINT), step())[1])
    return []


def _faults(mp: pytest.MonkeyPatch) -> list[str]:
    mp.setattr(Clean, "perturb", lambda self, batch: batch.x * float("nan"))
    return ["--max-faults", "2"]


# An --overwrite stopped in its first epoch: (how, exit code, needles of the error line).
OVERWRITE_STOPPED: list[tuple[Callable[[pytest.MonkeyPatch], list[str]], int, list[str]]] = [
    (_interrupt, 130, ["interrupted by SIGINT at epoch 1, step 2/4, before the new run finished its first epoch, so it "
                       "was not kept"]),
    (_faults, 1, ["stopped after 2 non-finite steps", "no checkpoint was written"]),
]


@pytest.mark.parametrize(("how", "code", "needles"), OVERWRITE_STOPPED, ids=["sigint", "faults"])
def test_an_overwrite_stopped_in_its_first_epoch_keeps_the_old_run(how, code, needles, tiny_data, run_copy,
                                                                   monkeypatch, capsys):
    before = snapshot(run_copy)
    with monkeypatch.context() as mp:
        flags = how(mp)
        rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(run_copy), "--overwrite", *flags], capsys)
    assert rc == code
    prefix = "apart-fast: " if code == 130 else "apart-fast: error: "
    assert_one_line(err, *needles, f"the run --overwrite would have replaced is back in {run_copy}", prefix=prefix)
    assert snapshot(run_copy) == before


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "run"
    with monkeypatch.context() as mp:
        mp.setattr(Clean, "step", lambda self, batch: (_ for _ in ()).throw(MemoryError("tried to allocate 9 EiB")))
        rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)
    assert rc == 1
    assert_one_line(err, "the run failed at step 0", "no checkpoint was written")
    assert not (tmp_path / "new").exists()
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)
    assert rc == 0, err


class Flat(nn.Module):
    """A user's model: one linear layer on the flattened image."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


# Python API models that do not fit the tiny data (2 classes of 3x8x8): (model, method, needles of the ConfigError).
MISFITS = [
    (lambda: Flat(3 * 16 * 16, 2), "clean", ["the model does not take this data's 3-channel 8x8 images",
                                             "batch of shape (2, 3, 8, 8)", "mat1 and mat2 shapes"]),
    (lambda: Flat(3 * 8 * 8, 1), "clean", ["the model returns (2, 1) for a batch of 2 images but the data has 2 "
                                           "classes", "shape (N, 2)"]),
    (lambda: Flat(3 * 8 * 8, 2), "apart", ["no residual or transformer block recognised in Flat", "--apart-sites",
                                           "--no-apart-layer-perturb",
                                           "ApartConfig(layer_perturb=False)"]),
]


@pytest.mark.parametrize(("build", "method", "needles"), MISFITS, ids=["input_size", "classes", "no_sites"])
def test_a_model_that_does_not_fit_is_a_config_error_before_anything_is_written(build, method, needles, tiny_data,
                                                                                tmp_path):
    cfg = Config(method=method, dataset="imagefolder", data_dir=str(tiny_data), width=4, batch_size=16, epochs=1,
                 eval_n=0, final_eval_steps=0, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as exc:
        apart_fast.train(cfg, model=build())
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))
    assert not (tmp_path / "run").exists()
    flags = vars(apart_fast.cli.build_parser().parse_args(["train", "--no-apart-layer-perturb"]))
    assert flags["apart_layer_perturb"] is False  # the flag the message names exists


def test_an_unknown_site_name_is_a_config_error_naming_only_its_own_fix(tiny_data, tmp_path):
    cfg = Config(method="apart", dataset="imagefolder", data_dir=str(tiny_data), width=4, batch_size=16, epochs=1,
                 eval_n=0, final_eval_steps=0, out=str(tmp_path / "run"), apart=ApartConfig(sites="fc,nope"))
    with pytest.raises(ConfigError) as exc:
        apart_fast.train(cfg, model=Flat(3 * 8 * 8, 2))
    msg = str(exc.value)
    assert "\n" not in msg and "no module 'nope'" in msg and "layer_perturb" not in msg  # naming a layer is the fix
    assert not (tmp_path / "run").exists()


def _sub_run(out: Path, finished: Path) -> None:
    shutil.copytree(finished, out / "fgsm_rs")


def _results(out: Path, finished: Path) -> None:
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}\n')


def _train_run(out: Path, finished: Path) -> None:
    shutil.copytree(finished, out)


def _user_files_in_a_sub_run(out: Path, finished: Path) -> None:
    (out / "fgsm_rs").mkdir(parents=True)
    (out / "fgsm_rs" / "config.json").write_text("{}")


# reproduce --out folders refused before anything is trained: (builder, extra flags, needles of the error line).
REPRODUCE_REFUSED = [
    (_sub_run, [], ["--out {out}/fgsm_rs already holds a run (checkpoint.pt)", "--overwrite"]),
    (_results, [], ["--out {out} already holds results (results.json)", "--resume", "--overwrite"]),
    (_train_run, [], ["--out {out} is the folder of a train run (checkpoint.pt)", "pass another --out"]),
    (_train_run, ["--overwrite"], ["--out {out} is the folder of a train run (checkpoint.pt)"]),
    (_user_files_in_a_sub_run, ["--overwrite"], ["--out {out}/fgsm_rs holds config.json but no run of apart-fast"]),
]


@pytest.mark.parametrize(("build", "flags", "needles"), REPRODUCE_REFUSED,
                         ids=["sub_run", "results", "train_run", "train_run_overwrite", "user_files"])
def test_reproduce_refuses_what_it_did_not_make(build, flags, needles, finished, tmp_path, capsys):
    out = tmp_path / "repro"
    build(out, finished)
    before = snapshot(tmp_path)
    rc, err = run_cli(["reproduce", "--preset", "tiny", "--methods", "fgsm_rs", "--device", "cpu", "--no-progress",
                       "--out", str(out), *flags], capsys)
    assert rc == 2
    assert_one_line(err, *[n.format(out=out) for n in needles])
    assert snapshot(tmp_path) == before


def test_reproduce_resume_continues_a_sub_run_that_holds_only_a_checkpoint(tiny_data, tmp_path, capsys):
    from apart_fast.data import load_dataset
    from apart_fast.reproduce import run_one

    out = tmp_path / "clean"
    assert run_cli(["train", *tiny_flags(tiny_data), "--device", "cpu", "--out", str(out)], capsys)[0] == 0
    (out / "results.json").unlink()  # an interrupted sub-run: a checkpoint, no results
    metrics = out / "metrics.jsonl"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "mark": "kept"}) + "\n")
    cfg = Config.from_dict(checkpoint.load(out / "checkpoint.pt")["config"])
    cfg.epochs = 2
    row = run_one("clean", cfg, load_dataset("imagefolder", str(tiny_data)), resume=True, progress=False)
    assert row["epochs"] == 2 and [h.get("mark") for h in row["history"]] == ["kept", None]
