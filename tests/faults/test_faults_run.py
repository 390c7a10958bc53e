"""Runs that fail midway (numeric faults, a full disk, out of memory) and evaluation input: exit 1 with the
checkpoint left named (2 for a failed start), one line, a finite and evaluable checkpoint; --debug shows
the traceback. One case per line: add a row to a table."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_one_line, make_image_folder, poison_step, run_cli, snapshot, tiny_flags
from torch import nn

from apart_fast import load_model
from apart_fast.cli import main
from apart_fast.config import Config, ConfigError
from apart_fast.data import load_dataset
from apart_fast.engine import checkpoint, loop
from apart_fast.engine import run as engine_run
from apart_fast.engine.checkpoint import CheckpointError
from apart_fast.methods.clean import Clean


def finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def first_bn(model: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_inf_batchnorm_statistics_with_a_finite_loss_are_a_skipped_step(tmp_path, monkeypatch):
    """The forward writes inf into a running variance while the loss stays finite: the step must be undone."""

    def inf_running_var(method, step):  # noqa: ANN001, ANN202
        def hook(module, inputs, output) -> None:  # noqa: ANN001
            module.running_var.data.fill_(float("inf"))  # the output (batch statistics) stays finite

        handle = first_bn(method.model).register_forward_hook(hook)
        try:
            return step()
        finally:
            handle.remove()

    poison_step(monkeypatch, 3, inf_running_var)
    data = load_dataset("synthetic", seed=0, synthetic_size=128)
    cfg = Config(method="clean", dataset="synthetic", width=4, epochs=1, batch_size=32, eval_n=0, final_eval_steps=0,
                 log_interval=2, out=str(tmp_path / "run"))
    res = loop.train(cfg, progress=False, data=data)
    assert res["skipped_steps"] == 1
    saved = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert finite(saved["model"])
    assert torch.isfinite(first_bn(res["model"]).running_var).all()


def nan_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Clean, "perturb", lambda self, batch: batch.x * float("nan"))


def test_fault_stop_leaves_a_finite_evaluable_checkpoint_and_its_resume_command_works(tiny_data, tmp_path,
                                                                                       monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        nan_inputs(mp)
        rc, err = run_cli(["train", *tiny_flags(tiny_data), "--max-faults", "3", "--out", str(out)], capsys)
    assert rc == 1
    assert_one_line(err, "stopped after 4 non-finite steps", "each of their updates was undone",
                    f"{out}/checkpoint.pt holds the finite state after step 4",
                    f"apart-fast eval --checkpoint {out}/checkpoint.pt", f"apart-fast train --resume {out} --lr")
    assert finite(checkpoint.load(out / "checkpoint.pt")["model"])
    rc, err = run_cli(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--dataset", "imagefolder", "--data-dir",
                       str(tiny_data), "--steps", "1"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["train", "--resume", str(out), "--lr", "0.1", "--max-faults", "5"], capsys)
    assert rc == 0, err  # --max-faults counts this start's faults: the resumed run does not stop at once
    assert json.loads((out / "config.json").read_text())["lr"] == 0.1


def test_a_non_finite_model_is_never_saved_over_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    """A buffer turned NaN behind the guard's back (after the keep flag was taken) at the last step of epoch 2."""

    def nan_after_the_flag(method, step):  # noqa: ANN001, ANN202
        out = step()
        first_bn(method.model).running_mean.fill_(float("nan"))
        return out

    out = tmp_path / "run"
    assert run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)[0] == 0
    good = snapshot(out)["checkpoint.pt"]
    poison_step(monkeypatch, 4, nan_after_the_flag)
    rc, err = run_cli(["train", "--resume", str(out), "--epochs", "2", "--no-progress"], capsys)
    assert rc == 1
    assert_one_line(err, "non-finite weights or BatchNorm statistics after step 8 (the end of epoch 2)",
                    "so it was not saved", f"{out}/checkpoint.pt holds the finite state after step 4 (the end of epoch 1)")
    assert snapshot(out)["checkpoint.pt"] == good


def test_disk_full_midway_exits_1_naming_the_checkpoint_and_resumes(tiny_data, tmp_path, monkeypatch, capsys):
    out, save, writes = tmp_path / "run", checkpoint.save, {"n": 0}

    def full_disk(path, payload):  # noqa: ANN001, ANN202
        if Path(path).name == "checkpoint.pt":
            writes["n"] += 1
            if writes["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(path, payload)

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "save", full_disk)
        rc, err = run_cli(["train", *tiny_flags(tiny_data), "--epochs", "2", "--out", str(out)], capsys)
    assert rc == 1
    assert_one_line(err, "the run failed at step 8 (the end of epoch 2)", "No space left on device",
                    f"{out}/checkpoint.pt holds the finite state after step 4 (the end of epoch 1)",
                    f"resume with: apart-fast train --resume {out}")
    assert checkpoint.load(out / "checkpoint.pt")["step_count"] == 4
    rc, err = run_cli(["train", "--resume", str(out)], capsys)
    assert rc == 0, err
    assert checkpoint.load(out / "checkpoint.pt")["step_count"] == 8


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 EiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 EiB")])
def test_out_of_memory_at_start_is_exit_2_and_debug_shows_the_traceback(error, tiny_data, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(engine_run, "build_model", oom)
    out = tmp_path / "run"
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)
    assert rc == 2
    assert_one_line(err, f"out of memory ({error}", "lower --batch-size")
    assert not out.exists()
    with pytest.raises(type(error)):
        main(["train", *tiny_flags(tiny_data), "--out", str(out), "--debug"])


def test_out_of_memory_midway_exits_1(tiny_data, tmp_path, monkeypatch, capsys):
    def cpu_oom(method, step):  # noqa: ANN001, ANN202
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    poison_step(monkeypatch, 2, cpu_oom)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(tmp_path / "run")], capsys)
    assert rc == 1
    assert_one_line(err, "the run failed at step 1 (epoch 1, step 1 of 4)", "can't allocate memory",
                    "no checkpoint was written")


def test_other_runtime_errors_are_not_hidden(tiny_data, tmp_path, monkeypatch):
    def bug(method, step):  # noqa: ANN001, ANN202
        raise RuntimeError("a bug, not a user error")

    poison_step(monkeypatch, 1, bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *tiny_flags(tiny_data), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("argv", [["train", "--backend", "nosuch", "--debug"], ["--debug", "train", "--backend", "nosuch"]])
def test_debug_raises_instead_of_one_line(argv, tiny_data):
    with pytest.raises(ConfigError, match="--backend 'nosuch'"):
        main([*argv, *tiny_flags(tiny_data)])


def _other_size(tmp: Path) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(make_image_folder(tmp / "big", 2, 2, size=16))]


# Evaluation input refused: (flags after --checkpoint <finished>/model.pt or a builder of them, needles).
BAD_EVAL = [
    (["--n", "-5"], ["--n -5 must be in [1, 2147483647]", "leave --n out"]),
    (["--n", "0"], ["--n 0 must be in [1,"]),
    (["--restarts", "0"], ["--restarts 0 must be in [1,"]),
    (["--seed", "1e30"], ["--seed 1000000000000000019884624838656 must be in [0, 2147483647]"]),
    (["--backend", "cuda"], ["--backend cuda cannot run on cpu"]),
    (["--device", "meta"], ["--device meta: apart_fast trains and evaluates on cpu or cuda devices only"]),
    (["--device", "mps"], ["--device mps: apart_fast trains and evaluates on cpu or cuda devices only"]),
    (_other_size, ["was trained on 8x8 images", "has 16x16", "pass the dataset it was trained on"]),
]


@pytest.mark.parametrize(("flags", "needles"), BAD_EVAL, ids=["n_negative", "n_zero", "restarts", "seed", "backend", "meta", "mps",
                                                               "size"])
def test_bad_eval_exits_2(flags, needles, finished, tiny_data, tmp_path, capsys):
    data = ["--dataset", "imagefolder", "--data-dir", str(tiny_data)]
    flags = flags(tmp_path) if callable(flags) else [*data, *flags]
    rc, err = run_cli(["eval", "--checkpoint", str(finished / "model.pt"), "--steps", "1", *flags], capsys)
    assert rc == 2
    assert_one_line(err, *needles)


def test_a_folder_given_as_checkpoint_names_the_file_to_pass(finished, capsys):
    with pytest.raises(CheckpointError, match=f"{finished} is a folder, not a file; pass {finished}/model.pt"):
        load_model(str(finished))
    rc, err = run_cli(["eval", "--checkpoint", str(finished), "--dataset", "imagefolder"], capsys)
    assert rc == 2
    assert_one_line(err, "is a folder, not a file")
