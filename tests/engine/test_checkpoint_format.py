"""Checkpoint files any PyTorch tool opens: ``torch.load(path, weights_only=True)`` reads every file a run
writes without apart_fast; damage is still one line from ``apart-fast eval`` and ``--resume``; files of
format 1 (a JSON header line before the torch archive) still load and resume.

``format1_run/`` holds model.pt and checkpoint.pt of a one-epoch clean run written by apart_fast at commit
15714b1 (format 1): ``train --method clean --dataset synthetic --model smallcnn --width 4 --batch-size 64
--epochs 1 --eval-n 16 --eval-steps 1 --final-eval-steps 0 --backend torch``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from reliability_helpers import subprocess_env

import apart_fast
from apart_fast.cli import main
from apart_fast.engine import checkpoint

FORMAT1 = Path(__file__).parent / "format1_run"
TINY = ["--method", "clean", "--dataset", "synthetic", "--model", "smallcnn", "--width", "4", "--batch-size", "64",
        "--epochs", "1", "--eval-n", "16", "--eval-steps", "1", "--final-eval-steps", "0", "--no-progress"]
FILES = ("model.pt", "model_best.pt", "model_ema.pt", "checkpoint.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run with a weight average, so it writes all four checkpoint files."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APART_FAST_PROBE", "0")
        assert main(["train", *TINY, "--ema", "0.9", "--out", str(out)]) == 0
    assert all((out / f).is_file() for f in FILES)
    return out


def test_plain_torch_load_opens_every_file_a_run_writes(run):
    """In a process that never imports apart_fast: each file is a dict of plain containers and tensors."""
    script = f"""
import json, sys, torch
for name in {list(FILES)!r}:
    d = torch.load({str(run)!r} + "/" + name, weights_only=True)
    weights = d["model"]
    assert isinstance(d, dict) and isinstance(d["config"], dict) and d["config"]["model"] == "smallcnn", name
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values()), name
    print(json.dumps([name, d["kind"], sorted(weights)[:2]]))
assert not any(m.startswith("apart_fast") for m in sys.modules), "apart_fast was imported"
"""
    env = subprocess_env()
    env.pop("PYTHONPATH")  # nothing of this checkout on the path
    res = subprocess.run([sys.executable, "-c", script], cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    kinds = {json.loads(line)[0]: json.loads(line)[1] for line in res.stdout.splitlines()}
    assert kinds == {"model.pt": "model", "model_best.pt": "model", "model_ema.pt": "model", "checkpoint.pt": "full"}
    model = apart_fast.load_model(str(run / "model.pt"))
    plain = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())


def test_the_integrity_record_covers_every_other_record(run):
    """What a reader without apart_fast can check: the SHA-256 of every other record, in archive order."""
    with zipfile.ZipFile(run / "model.pt") as zf:
        names = zf.namelist()
        record = json.loads(zf.read(names[-1]))
        h = hashlib.sha256()
        for info in zf.infolist()[:-1]:
            h.update(info.filename.encode() + b"\0" + info.file_size.to_bytes(8, "little") + zf.read(info))
    assert names[-1].endswith("/apart_fast.json") and names[0].endswith("/data.pkl")
    assert record == {"magic": checkpoint.MAGIC, "format": 2, "sha256": h.hexdigest()}
    for f in FILES:
        assert checkpoint.is_run_checkpoint(run / f)


def _damaged(raw: bytes, how: str) -> bytes:
    """``raw`` cut short or with one byte flipped in a named part of its zip archive."""
    zf = zipfile.ZipFile(io.BytesIO(raw))
    infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}
    tensor = next(i for n, i in infos.items() if n.startswith("data/"))

    def flip(at: int) -> bytes:
        return raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1:]

    def data_start(info: zipfile.ZipInfo) -> int:  # after the local header, its name and its extra field
        n, e = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
            int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
        return info.header_offset + 30 + n + e

    return {
        "truncate-1": lambda: raw[:-1],
        "truncate-half": lambda: raw[: len(raw) // 2],
        "truncate-head": lambda: raw[:40],
        "flip-pickle": lambda: flip(data_start(infos["data.pkl"]) + 20),
        "flip-tensor": lambda: flip(data_start(tensor) + tensor.file_size // 2),
        "flip-record": lambda: flip(data_start(infos["apart_fast.json"]) + 60),
        "flip-directory": lambda: flip(zf.start_dir + 50),
        "flip-end": lambda: flip(len(raw) - 10),
    }[how]()


DAMAGE = ("truncate-1", "truncate-half", "truncate-head", "flip-pickle", "flip-tensor", "flip-record", "flip-directory",
          "flip-end")


@pytest.mark.parametrize("name", FILES)
def test_damaged_files_are_one_line_errors_for_eval_and_resume(run, name, tmp_path, capsys):
    raw = (run / name).read_bytes()
    for how in DAMAGE:
        folder = tmp_path / how
        folder.mkdir()
        target = folder / name
        target.write_bytes(_damaged(raw, how))
        needle = "truncated" if how.startswith("truncate") else "corrupted"
        commands = [["eval", "--checkpoint", str(target), "--dataset", "synthetic", "--steps", "1", "--no-progress"]]
        if name == "checkpoint.pt":
            commands.append(["train", "--resume", str(folder)])
        for argv in commands:
            capsys.readouterr()
            assert main(argv) == 2, (how, argv)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"apart-fast: error: {target}"), (how, err)
            assert needle in err and "Traceback" not in err, (how, err)
        assert sorted(p.name for p in folder.iterdir()) == [name], how  # nothing written


def test_a_plain_torch_file_is_not_taken_for_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    assert not checkpoint.is_run_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError, match="not an apart_fast checkpoint"):
        checkpoint.load(path)
    for other in (tmp_path / "missing.pt", tmp_path):
        assert not checkpoint.is_run_checkpoint(other)


def test_format1_files_load_evaluate_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    for name in ("model.pt", "checkpoint.pt"):
        raw = (FORMAT1 / name).read_bytes()
        header, body = raw.split(b"\n", 1)
        assert json.loads(header)["format"] == 1 and checkpoint.is_run_checkpoint(FORMAT1 / name)
        plain = torch.load(io.BytesIO(body), weights_only=True)["model"]
        model = apart_fast.load_model(str(FORMAT1 / name))
        assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    assert main(["eval", "--checkpoint", str(FORMAT1 / "model.pt"), "--steps", "1", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "synthetic"  # the run's, from its config
    copy = tmp_path / "run"
    shutil.copytree(FORMAT1, copy)
    assert main(["train", "--resume", str(copy), "--epochs", "2", "--no-progress"]) == 0
    resumed = checkpoint.load(copy / "checkpoint.pt")
    assert resumed["epoch"] == 2 and (copy / "checkpoint.pt").read_bytes()[:4] == b"PK\x03\x04"  # rewritten as format 2
    raw = (FORMAT1 / "checkpoint.pt").read_bytes()
    for damaged, needle in ((raw[:-1], "truncated"), (raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:], "checksum")):
        (copy / "checkpoint.pt").write_bytes(damaged)
        capsys.readouterr()
        assert main(["train", "--resume", str(copy)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_checkpoint_written_under_a_crc_free_torch_setting_still_verifies(tmp_path):
    """``torch.serialization.set_crc32_options(False)`` elsewhere in the process does not make our files unreadable."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        checkpoint.save(tmp_path / "x.pt", {"kind": "model", "model": {"w": torch.arange(6.0)}})
    finally:
        torch.serialization.set_crc32_options(before)
    assert torch.equal(checkpoint.load(tmp_path / "x.pt")["model"]["w"], torch.arange(6.0))
    assert torch.serialization.get_crc32_options() == before


def test_checkpoint_bytes_are_deterministic(tmp_path):
    payload = {"kind": "model", "model": {"w": torch.arange(6.0)}, "config": {"seed": 0}}
    checkpoint.save(tmp_path / "a.pt", payload)
    checkpoint.save(tmp_path / "b.pt", payload)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
