"""Bad input, found in the validation phase: exit 2, one line naming the value and the fix, and nothing
written (a new --out is not created; an old run under --overwrite keeps every file bit for bit).
One case per line: add a row to a table."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import assert_one_line, make_image_folder, run_cli, snapshot, tiny_flags
from PIL import Image

import apart_fast
from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.data import load_dataset

# Settings refused before the first step: (flags added to the tiny run, needles of the error line).
BAD_SETTINGS = [
    (["--final-eval-restarts", "0"], ["--final-eval-restarts 0", "positive"]),
    (["--log-interval", "100000000000"], ["--log-interval 100000000000", "too large"]),
    (["--log-interval", "1e11"], ["--log-interval 100000000000", "too large"]),
    (["--seed", "-1"], ["--seed -1", "negative"]),
    (["--seed", str(2**40)], ["--seed 1099511627776", "too large"]),
    (["--backend", "nosuch"], ["--backend 'nosuch'", "choose one of"]),
    (["--backend", "cuda"], ["--backend cuda cannot run on cpu", "--backend auto"]),
    (["--device", "gpu0"], ["--device 'gpu0' is not a device"]),
    (["--batch-size", "500"], ["--batch-size 500", "64 training examples"]),
    (["--pad", "-1"], ["--pad -1", "negative"]),
    (["--eval-every", "0"], ["--eval-every 0", "positive"]),
]


@pytest.mark.parametrize(("flags", "needles"), BAD_SETTINGS)
def test_bad_setting_exits_2_and_creates_nothing(flags, needles, tiny_data, tmp_path, capsys):
    out = tmp_path / "new"
    rc, err = run_cli(["train", *tiny_flags(tiny_data), *flags, "--out", str(out)], capsys)
    assert rc == 2
    assert_one_line(err, *needles)
    assert not out.exists()


@pytest.mark.parametrize(("flags", "needles"), BAD_SETTINGS)
def test_bad_setting_with_overwrite_leaves_the_old_run_bit_identical(flags, needles, tiny_data, run_copy, capsys):
    before = snapshot(run_copy)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), *flags, "--out", str(run_copy), "--overwrite"], capsys)
    assert rc == 2
    assert_one_line(err, *needles)
    assert snapshot(run_copy) == before


def test_corrected_rerun_after_a_bad_start_is_not_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "new"
    assert run_cli(["train", *tiny_flags(tiny_data), "--backend", "nosuch", "--out", str(out)], capsys)[0] == 2
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(out)], capsys)
    assert rc == 0, err
    assert (out / "checkpoint.pt").is_file()


# Python API: wrong types fail at construction, naming the field: (Config keyword arguments, needle).
TYPE_ERRORS = [
    ({"batch_size": 64.5}, "Config.batch_size = 64.5 is a float; --batch-size must be an int"),
    ({"epochs": "3"}, "Config.epochs = '3' is a str; --epochs must be an int"),
    ({"lr": "0.1"}, "Config.lr = '0.1' is a str; --lr must be a number"),
    ({"flip": 1}, "Config.flip = 1 is a int; --flip must be a bool or None"),
    ({"width": True}, "Config.width = True is a bool; --width must be an int or None"),
    ({"out": 3}, "Config.out = 3 is a int; --out must be a str or None"),
    ({"apart": {"lr": 1.0}}, "Config.apart = {'lr': 1.0} is a dict; pass an ApartConfig"),
]


@pytest.mark.parametrize(("kwargs", "needle"), TYPE_ERRORS)
def test_config_type_errors_name_the_field(kwargs, needle):
    with pytest.raises(ConfigError) as exc:
        Config(**kwargs)
    assert needle in str(exc.value)
    with pytest.raises(ConfigError, match=list(kwargs)[0]):
        apart_fast.train(**kwargs)


def test_config_types_are_checked_again_after_assignment_and_numbers_are_normalised():
    with pytest.raises(ConfigError, match="ApartConfig.lr = 'x' is a str; --apart-lr must be a number"):
        ApartConfig(lr="x")
    cfg = Config()
    cfg.batch_size = 64.5
    with pytest.raises(ConfigError, match="Config.batch_size = 64.5"):
        cfg.validate()
    cfg = Config(batch_size=np.int64(32), lr=1)
    assert type(cfg.batch_size) is int and type(cfg.lr) is float


def _gz_corrupt_near_end(tmp: Path) -> Path:
    raw = bytearray(_archive(tmp, "data.tar.gz", "w:gz").read_bytes())
    raw[-100] ^= 0xFF
    (tmp / "data.tar.gz").write_bytes(bytes(raw))
    return tmp / "data.tar.gz"


def _gz_truncated(tmp: Path) -> Path:
    path = _archive(tmp, "data.tar.gz", "w:gz")
    path.write_bytes(path.read_bytes()[:-300])
    return path


def _tar_bad_header_midway(tmp: Path) -> Path:
    path = _archive(tmp, "data.tar", "w")
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        late = tar.getmembers()[-10].offset  # a header near the end: the listing would stop there
    raw[late + 148: late + 156] = b"garbage!"  # its checksum field
    path.write_bytes(bytes(raw))
    return path


def _archive(tmp: Path, name: str, mode: str) -> Path:
    tree = make_image_folder(tmp / "tree")
    with tarfile.open(tmp / name, mode) as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=split)
    return tmp / name


def _dangling_symlink(tmp: Path) -> Path:
    root = make_image_folder(tmp / "data")
    os.symlink(tmp / "nothing.png", root / "train" / "c0" / "gone.png")
    return root


def _looping_symlink(tmp: Path) -> Path:
    root = make_image_folder(tmp / "data")
    os.symlink(root / "test" / "c1" / "loop", root / "test" / "c1" / "loop")
    return root


def _looping_class_folder(tmp: Path) -> Path:
    root = make_image_folder(tmp / "data")
    os.symlink(root / "train" / "c2", root / "train" / "c2")
    return root


# Data that must not train: (builder of --data-dir in a temp folder, needles of the error line).
BAD_DATA: list[tuple[Callable[[Path], Path], list[str]]] = [
    (_gz_corrupt_near_end, ["data.tar.gz is not a readable, intact tar archive", "CRC"]),
    (_gz_truncated, ["data.tar.gz is not a readable, intact tar archive"]),
    (_tar_bad_header_midway, ["data.tar is damaged", "corrupted member header"]),
    (_dangling_symlink, ["gone.png is a symlink that leads nowhere"]),
    (_looping_symlink, ["loop is a symlink that leads nowhere"]),
    (_looping_class_folder, ["c2 is a symlink that leads nowhere"]),
]


@pytest.mark.parametrize(("build", "needles"), BAD_DATA, ids=[b.__name__.strip("_") for b, _ in BAD_DATA])
def test_bad_data_exits_2_and_creates_nothing(build, needles, tmp_path, capsys):
    data = build(tmp_path)
    out = tmp_path / "new"
    rc, err = run_cli(["train", *tiny_flags(data), "--out", str(out)], capsys)
    assert rc == 2
    assert_one_line(err, *needles)
    assert not out.exists()


def test_intact_archives_still_load(tmp_path):
    for name, mode in (("a.tar.gz", "w:gz"), ("b.tar", "w")):
        data = load_dataset("imagefolder", str(_archive(tmp_path / name, name, mode)), cache_dir=str(tmp_path / "c"))
        assert data.train_x.shape == (64, 3, 8, 8)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "data"
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0 .. 63000
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(values).save(root / split / c / "x.png")
    assert Image.open(root / "train" / "a" / "x.png").mode.startswith("I")
    data = load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "c"))
    expected = np.round(values / 257.0).astype(np.uint8)
    assert data.train_x.shape == (2, 1, 8, 8)
    assert np.array_equal(data.train_x[0, 0].numpy(), expected)


def test_gzip_stream_check_is_the_archive_not_its_name(tmp_path):
    """A .tar.gz that is gzip of garbage is refused as an archive, not as a layout problem."""
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(io.BytesIO(b"x" * 5000).getvalue()))
    with pytest.raises(ValueError, match="not a readable, intact tar archive"):
        load_dataset("imagefolder", str(tmp_path / "junk.tar.gz"), cache_dir=str(tmp_path / "c"))


def test_unwritable_data_cache_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("APART_FAST_CACHE", str(tmp_path / "file" / "cache"))
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(tmp_path / "new")], capsys)
    assert rc == 2
    assert_one_line(err, "cannot use", "Not a directory", "while loading imagefolder", "$APART_FAST_CACHE")
    assert not (tmp_path / "new").exists()
