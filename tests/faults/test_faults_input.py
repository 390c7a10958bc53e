"""Bad input, found in the validation phase: exit 2, one line naming the value and the fix, and nothing
written (a new --out is not created; an old run under --overwrite keeps every file bit for bit).
One case per line: add a row to a table."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import assert_one_line, make_image_folder, run_cli, snapshot, tiny_flags
from PIL import Image

import apart_fast
from apart_fast.cli import main
from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.data import load_dataset
from apart_fast.engine import out_dir

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
    (["--device", "meta"], ["--device meta: apart_fast trains and evaluates on cpu or cuda devices only"]),
    (["--device", "mps"], ["--device mps: apart_fast trains and evaluates on cpu or cuda devices only"]),
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


# A data folder given must be used or the run refused: (flags after --method clean --width 4, needles).
IGNORED_DATA_DIR = [
    (lambda tmp, data: ["--data-dir", str(data)], ["--data-dir {data} was given but dataset digits is built in",
                                                   "pass --dataset imagefolder"]),
    (lambda tmp, data: ["--data-dir", str(tmp / "nowhere")], ["--data-dir {tmp}/nowhere was given but dataset digits"]),
    (lambda tmp, data: ["--dataset", "synthetic", "--data-dir", str(data)], ["dataset synthetic is built in"]),
]


@pytest.mark.parametrize(("flags", "needles"), IGNORED_DATA_DIR, ids=["digits", "digits_nowhere", "synthetic"])
def test_a_data_dir_a_built_in_dataset_would_ignore_is_refused(flags, needles, tiny_data, tmp_path, capsys):
    out = tmp_path / "new"
    rc, err = run_cli(["train", "--method", "clean", "--width", "4", "--epochs", "1", "--no-progress",
                       *flags(tmp_path, tiny_data), "--out", str(out)], capsys)
    assert rc == 2
    assert_one_line(err, *[n.format(tmp=tmp_path, data=tiny_data) for n in needles])
    assert not out.exists()


def _eval_json(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, dict, str]:
    capsys.readouterr()
    rc = main([*argv, "--json"])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out) if rc == 0 else {}, cap.err


def test_a_relative_data_dir_is_kept_absolute_and_eval_checks_the_datas_fingerprint(tmp_path, monkeypatch, capsys):
    here, there, run = tmp_path / "here", tmp_path / "there", tmp_path / "run"
    make_image_folder(here / "data")  # 16 test images
    make_image_folder(there / "data", n_test=3)  # a folder of the same name and image size elsewhere: 6 test images
    monkeypatch.chdir(here)
    assert run_cli(["train", *tiny_flags(Path("data")), "--out", str(run)], capsys)[0] == 0
    assert json.loads((run / "config.json").read_text())["data_dir"] == str(here / "data")
    monkeypatch.chdir(there)
    rc, res, err = _eval_json(["eval", "--checkpoint", str(run / "model.pt"), "--steps", "1"], capsys)
    assert rc == 0 and res["n"] == 16, err
    Image.new("RGB", (8, 8), (1, 2, 3)).save(here / "data" / "test" / "c0" / "0.png")
    rc, res, err = _eval_json(["eval", "--checkpoint", str(run / "model.pt"), "--steps", "1"], capsys)
    assert rc == 2
    assert_one_line(err, "model.pt was trained on other data than imagefolder", "same sizes, different images or labels",
                    "pass --dataset and --data-dir of the data it was trained on")
    rc, res, err = _eval_json(["eval", "--checkpoint", str(run / "model.pt"), "--steps", "1", "--data-dir", "data"],
                              capsys)
    assert rc == 0 and res["n"] == 6, err  # other data asked for by name is evaluated


def test_eval_splits_the_runs_own_data_with_the_runs_seed(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = run_cli(["train", "--method", "clean", "--width", "4", "--epochs", "1", "--eval-n", "0",
                       "--final-eval-steps", "0", "--no-progress", "--seed", "5", "--out", str(run)], capsys)
    assert rc == 0, err
    rc, res, err = _eval_json(["eval", "--checkpoint", str(run / "model.pt"), "--steps", "0"], capsys)
    assert rc == 0, err
    trained = json.loads((run / "results.json").read_text())["test_clean_acc"]
    assert res["clean_acc"] == pytest.approx(trained)  # the run's test split, not seed 0's (which overlaps its training)


def test_the_decoded_cache_follows_a_symlinked_class_folder_to_its_new_target(tmp_path):
    root = make_image_folder(tmp_path / "data")
    for name, n in (("old", 24), ("new", 25)):
        make_image_folder(tmp_path / name, n_train=n, n_test=1, classes=1)
    link = root / "train" / "c0"
    shutil.rmtree(link)
    link.symlink_to(tmp_path / "old" / "train" / "c0")
    assert load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "c")).train_x.shape[0] == 24 + 32
    link.unlink()
    link.symlink_to(tmp_path / "new" / "train" / "c0")
    assert load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "c")).train_x.shape[0] == 25 + 32


def test_transparent_pixels_are_composited_over_grey_and_said_once_per_load(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data")
    red = np.zeros((8, 8, 4), dtype=np.uint8)
    red[..., 0], red[4:, :, 3] = 255, 255  # rows 0-3 transparent red, rows 4-7 opaque red
    Image.fromarray(red, "RGBA").save(root / "train" / "c0" / "a.png")
    Image.fromarray(red, "RGBA").convert("P").save(root / "train" / "c0" / "b.png", transparency=0)  # a palette's key
    for _ in range(2):  # decoded, then from the cache: the warning each time, once
        capsys.readouterr()
        x = load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "c")).train_x
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("apart-fast: warning: 2 image(s) with transparent pixels"), err
        assert f"(the first: {root}/train/c0/a.png) composited over grey 128/255" in err[0]
        a = x[32]  # a.png sorts after 0.png ... 9.png
        assert (a[:, :4] == 128).all() and (a[0, 4:] == 255).all() and (a[1:, 4:] == 0).all()


def _png_header_only(path: Path, size: int) -> None:
    """An 8-bit greyscale PNG whose header claims size x size pixels but whose data holds four rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (size + 1) * 4))
                     + chunk(b"IEND", b""))


# Images whose header alone refuses them: (class folder, name, claimed size, needle after the file's name).
HUGE = [
    ("c0", "!.png", 12000, "is too large to decode safely (Image size (144000000 pixels) exceeds limit"),
    ("c1", "z.png", 9000, "is 9000x9000 (WxH) but the images before it are 8x8; resize all images to one size"),
]


@pytest.mark.parametrize(("folder", "name", "size", "needle"), HUGE, ids=["first", "later"])
def test_an_image_too_large_is_refused_from_its_header_naming_it(folder, name, size, needle, tmp_path):
    root = make_image_folder(tmp_path / "data")
    _png_header_only(root / "train" / folder / name, size)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(ValueError) as exc:
        warnings.simplefilter("always")
        load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "c"))
    assert f"{root}/train/{folder}/{name} {needle}" in str(exc.value)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_triton_on_a_cpu_without_its_interpreter_is_refused_before_anything_is_written(tiny_data, finished, tmp_path):
    out = tmp_path / "new"
    code = "import sys; from apart_fast.cli import main; a = sys.argv[1:]; i = a.index('--'); print(main(a[:i]), main(a[i + 1:]))"
    argv = ["train", *tiny_flags(tiny_data), "--backend", "triton", "--out", str(out), "--",
            "eval", "--checkpoint", str(finished / "model.pt"), "--backend", "triton", "--steps", "1"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["2", "2"], proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr
    for line in lines:
        assert line.startswith("apart-fast: error: --backend triton cannot run on cpu:"), line
        assert "TRITON_INTERPRET=1" in line and "pass --backend auto or torch" in line
    assert not out.exists()


def test_names_the_locale_cannot_decode_are_used_as_given(tmp_path, capsys):
    """Under LANG=C Python decodes a non-UTF-8 byte of argv as a lone surrogate (PEP 383): paths must stay usable."""
    data = make_image_folder(Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xe9ta")))
    out = os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9")
    assert "\udce9" in out
    rc, err = run_cli(["train", *tiny_flags(data), "--out", out], capsys)
    assert rc == 0, err
    rc, err = run_cli(["eval", "--checkpoint", f"{out}/model.pt", "--steps", "1"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["train", "--resume", out, "--epochs", "2"], capsys)
    assert rc == 0, err


def test_a_name_no_write_can_encode_is_named_in_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    name = "r\udce9"

    def refuse(path, flag="--out"):  # noqa: ANN001, ANN202
        name.encode()

    monkeypatch.setattr(out_dir, "check_writable", refuse)
    rc, err = run_cli(["train", *tiny_flags(tiny_data), "--out", str(tmp_path / name)], capsys)
    assert rc == 2
    assert_one_line(err, "'r\\udce9' holds characters that cannot be encoded (surrogates not allowed)", "LANG=C.UTF-8")
