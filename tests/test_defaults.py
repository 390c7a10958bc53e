"""What a run does with no flags beyond the method and data: the dataset's model, width and epochs (the
paper's on CIFAR), a fresh runs/ folder named at the start and the end (``--out none``: nothing saved),
and a log without a terminal that is one line per epoch, not progress-bar frames."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apart_fast.cli import build_parser, main
from apart_fast.config import Config
from apart_fast.engine import loop, out_dir

TINY = ["--method", "clean", "--dataset", "synthetic", "--model", "smallcnn", "--width", "4", "--batch-size", "64",
        "--epochs", "2", "--eval-n", "16", "--eval-steps", "1", "--final-eval-steps", "0"]
FORMAT1_CONFIG = Path(__file__).parent / "engine" / "format1_run" / "config.json"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No epoch probe, a private data cache, and tmp_path as the working folder (where runs/ goes)."""
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    monkeypatch.setenv("APART_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _image_folder(root: Path, size: int, classes: int = 10, n_train: int = 15, n_test: int = 2) -> Path:
    """An ImageFolder tree (train/ and test/) of ``classes`` classes of size x size RGB PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


class _Stop(Exception):
    """Raised in place of training, once the run is set up."""


def test_cifar10_with_no_other_flag_sets_up_preact18_width_64_for_30_epochs_in_runs(tmp_path, monkeypatch, capsys):
    data = _image_folder(tmp_path / "data", 32)
    seen = {}

    def stop(run: loop.Run, out: Path | None, *args: object) -> None:
        # config.json is read here: a start stopped before its first checkpoint removes what it wrote
        seen.update(cfg=run.cfg, out=out, saved=json.loads((out / "config.json").read_text()))
        raise _Stop

    monkeypatch.setattr(loop, "_train_loop", stop)
    with pytest.raises(_Stop):
        main(["train", "--method", "apart", "--dataset", "cifar10", "--data-dir", str(data)])
    cfg, out = seen["cfg"], seen["out"]
    assert (cfg.model, cfg.width, cfg.epochs) == ("preact18", 64, 30)
    assert re.fullmatch(r"runs/apart-cifar10-\d{8}-\d{6}", str(out)), out
    saved = seen["saved"]
    assert (saved["model"], saved["width"], saved["epochs"], saved["out"]) == ("preact18", 64, 30, str(out))
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("apart-fast: apart on cpu") and "preact18 width 64, 30 epochs" in first, first
    assert "(--model/--width/--epochs: cifar10's defaults)" in first and f"writing to {out}" in first, first


def test_help_shows_the_per_dataset_defaults():
    text = build_parser().train_parser.format_help()  # type: ignore[attr-defined]
    flat = " ".join(text.split())
    assert "--model MODEL architecture: preact18, wrn34_10, smallcnn, vit, or torchvision:NAME" in flat
    assert "see --apart-sites) (default by --dataset: digits/synthetic smallcnn, " \
           "cifar10/cifar100 preact18, imagefolder smallcnn for images under 32 px, else preact18)" in flat
    assert "(default by --dataset: digits/synthetic 16, cifar10/cifar100 64, imagefolder 16" in flat
    assert "(default by --dataset: digits 15, synthetic 10, cifar10/cifar100 30, imagefolder 15 for images under 32 " \
           "px, else 30)" in flat
    assert "defaultauto:afreshruns/<method>-<dataset>-<date-time>/;none:savenothing" in "".join(text.split())


def test_config_defaults_per_dataset_and_old_configs_unchanged():
    assert Config().model is None and Config().epochs is None  # filled when a run starts (resolved)
    got = {d: (c.model, c.width, c.epochs) for d in ("digits", "synthetic", "cifar10", "cifar100")
           for c in [Config(dataset=d).resolved()]}
    assert got == {"digits": ("smallcnn", 16, 15), "synthetic": ("smallcnn", 16, 10), "cifar10": ("preact18", 64, 30),
                   "cifar100": ("preact18", 64, 30)}
    assert Config(dataset="imagefolder").resolved().model is None  # by image size, known once the data is read
    assert Config(dataset="imagefolder").resolved((8, 8)).model == "smallcnn"
    assert (Config(dataset="imagefolder").resolved((32, 32)).model, Config(dataset="imagefolder").resolved((64, 48)).epochs) \
        == ("preact18", 30)
    given = Config(dataset="cifar10", model="smallcnn", width=8, epochs=2).resolved()
    assert (given.model, given.width, given.epochs) == ("smallcnn", 8, 2)
    assert Config(dataset="cifar10", model="wrn34_10").resolved().width is None  # the model's own widen factor
    assert Config(dataset="cifar10", width=16).resolved().model == "preact18"
    old = Config.from_dict(json.loads(FORMAT1_CONFIG.read_text()))  # a config.json written before the defaults
    assert (old.model, old.width, old.epochs) == ("smallcnn", 4, 1) and old.resolved().model == "smallcnn"


def test_imagefolder_of_small_images_gets_smallcnn(tmp_path):
    data = _image_folder(tmp_path / "data", 8, classes=2, n_train=40)
    res = loop.train(Config(method="clean", dataset="imagefolder", data_dir=str(data), batch_size=16, eval_n=0,
                            final_eval_steps=0, epochs=1), progress=False)
    assert res["model"].config["name"] == "smallcnn" and res["model"].config["kwargs"]["width"] == 16


def test_default_out_folder_is_fresh_and_named_at_start_and_end_and_the_log_has_one_line_per_epoch(tmp_path, capsys):
    assert main(["train", *TINY]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out[cap.out.index("{"):])
    out = res["out"]
    assert re.fullmatch(r"runs/clean-synthetic-\d{8}-\d{6}", out) and (tmp_path / out / "model.pt").is_file()
    err = cap.err.splitlines()
    assert err[0].startswith("apart-fast: clean on cpu") and err[0].endswith(f"writing to {out}")
    assert err[-1] == f"apart-fast: the run is in {out}"
    assert "\r" not in cap.err and "\x1b" not in cap.err  # no progress-bar frames without a terminal
    epochs = [line for line in cap.out.splitlines() if line.startswith("[clean] epoch")]
    assert [line.split(":")[0] for line in epochs] == ["[clean] epoch 1", "[clean] epoch 2"]
    assert main(["train", *TINY, "--no-progress"]) == 0  # a second run the same second gets a folder of its own
    second = json.loads(capsys.readouterr().out)["out"]
    assert second != out and sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([Path(out).name, Path(second).name])


def test_out_none_saves_nothing(tmp_path, capsys):
    assert main(["train", *TINY, "--out", "none"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out[cap.out.index("{"):])["out"] is None
    err = cap.err.splitlines()
    assert err[0].endswith("no output folder (--out none): nothing will be saved")
    assert err[-1] == "apart-fast: --out none: nothing was saved"
    assert list(tmp_path.iterdir()) == []  # no runs/, nothing else


def test_auto_out_dir_takes_the_next_free_name(tmp_path, monkeypatch):
    monkeypatch.setattr(out_dir.time, "strftime", lambda fmt: "20250102-030405")
    cfg = Config(method="apart", dataset="cifar10")
    assert out_dir.auto_out_dir(cfg, tmp_path) == str(tmp_path / "apart-cifar10-20250102-030405")
    (tmp_path / "apart-cifar10-20250102-030405").mkdir()
    (tmp_path / "apart-cifar10-20250102-030405-2").mkdir()
    assert out_dir.auto_out_dir(cfg, tmp_path) == str(tmp_path / "apart-cifar10-20250102-030405-3")


def test_first_line_names_a_users_model_and_only_the_defaults_it_took(monkeypatch, capsys):
    import torch
    from torch import nn

    def stop(run: loop.Run, *args: object) -> None:
        raise _Stop

    monkeypatch.setattr(loop, "_train_loop", stop)
    mine = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    mine(torch.zeros(1, 3, 16, 16))
    with pytest.raises(_Stop):
        loop.train(Config(method="clean", dataset="synthetic", batch_size=64, eval_n=0), model=mine)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith("; your Sequential, 10 epochs (--epochs: synthetic's defaults); no output folder (--out none): "
                          "nothing will be saved"), first
