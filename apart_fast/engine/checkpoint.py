"""Checkpoint files: archives any PyTorch tool opens, written atomically, with a format version and a SHA-256.

Format 2 (written now): the zip archive ``torch.save`` writes of a plain dict of containers and tensors,
so ``torch.load(path, weights_only=True)`` opens it without apart_fast, plus one record torch ignores,
``<archive>/apart_fast.json``: ``{"magic", "format", "sha256"}``, the SHA-256 covering the name, size and
bytes of every other record in archive order. ``load`` checks that record, every record's CRC-32 and the
SHA-256 before unpickling, so a truncated, corrupted or foreign file gives a one-line ``CheckpointError``.
Format 1 (written before): one JSON header line (magic, format, payload length, payload sha256), then
the ``torch.save`` bytes; ``load`` still reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

MAGIC = "apart_fast-checkpoint"
FORMAT_VERSION = 2
RECORD = "apart_fast.json"  # the integrity record, beside torch's records in the archive's folder
_FORMAT1_START = b'{"magic": "' + MAGIC.encode()  # how a format-1 file begins
_ZIP_START = b"PK\x03\x04"  # a zip archive's first local header
_ZIP_END, _ZIP_END_SEARCH = b"PK\x05\x06", 22 + 65535  # its end-of-directory record, within this many final bytes
_CHUNK = 1 << 20


_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would make checkpoints private; use the ordinary mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _record_name(zf: zipfile.ZipFile) -> str:
    """The integrity record's name: in the folder of the archive's first record (torch's ``archive/``)."""
    names = zf.namelist()
    return f"{names[0].split('/')[0]}/{RECORD}" if names else RECORD


def _digest(zf: zipfile.ZipFile) -> str:
    """SHA-256 of the name, size and bytes of every record but the integrity record, in archive order.

    Reading a record also checks its CRC-32 (``zipfile.BadZipFile`` on a mismatch)."""
    skip = _record_name(zf)
    h = hashlib.sha256()
    for info in zf.infolist():
        if info.filename == skip:
            continue
        h.update(info.filename.encode() + b"\0" + info.file_size.to_bytes(8, "little"))
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plain containers and tensors) as a ``torch.save`` archive plus its integrity record."""
    buf = io.BytesIO()
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)  # load() checks every record's CRC-32
    try:
        torch.save(payload, buf)
    finally:
        torch.serialization.set_crc32_options(crc)
    with zipfile.ZipFile(buf, "a") as zf:
        record = {"magic": MAGIC, "format": FORMAT_VERSION, "sha256": _digest(zf)}
        zf.writestr(zipfile.ZipInfo(_record_name(zf)), json.dumps(record))  # fixed 1980 timestamp: same bytes each time
    atomic_write_bytes(path, buf.getvalue())


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state dict (what a checkpoint of it takes on disk, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def is_run_checkpoint(path: str | Path) -> bool:
    """True iff ``path`` is a file written by ``save`` (any format version): judged from a format-1 header or
    a format-2 zip directory holding the integrity record, without reading the tensors. A format-2 file cut
    short has lost its directory and is not recognised (``load`` calls it truncated)."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(_FORMAT1_START))
            if start == _FORMAT1_START:
                return True
            if not start.startswith(_ZIP_START):
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                return _record_name(zf) in zf.NameToInfo
    except Exception:  # unreadable or damaged: not recognisably ours
        return False


def _format1_body(path: Path, raw: bytes) -> bytes:
    """The ``torch.save`` bytes of a format-1 file, after checking its header, length and checksum."""
    first = raw[:4096].split(b"\n", 1)[0] + (b"\n" if b"\n" in raw[:4096] else b"")
    try:
        header = json.loads(first)
        ok = (isinstance(header, dict) and header.get("magic") == MAGIC and isinstance(header.get("format"), int)
              and isinstance(header.get("length"), int) and isinstance(header.get("sha256"), str))
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        if not first.endswith(b"\n") and first.startswith(_FORMAT1_START):
            raise CheckpointError(f"{path} is truncated inside its header; use an earlier checkpoint or retrain")
        raise CheckpointError(f"{path} is not an apart_fast checkpoint; pass a file written by apart-fast train")
    if header["format"] != 1:
        raise CheckpointError(f"{path} has a format-1 header claiming format {header['format']}; it is corrupted: "
                              "use an earlier checkpoint or retrain")
    body = raw[len(first):]
    if len(body) != header["length"]:
        raise CheckpointError(f"{path} is truncated ({len(body)} of {header['length']} bytes); use an earlier checkpoint or retrain")
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{path} fails its checksum (corrupted); use an earlier checkpoint or retrain")
    return body


def _check_format2(path: Path, raw: bytes) -> None:
    """Verify a format-2 file: a whole zip archive, every record's CRC-32, the integrity record and its SHA-256."""
    retry = "use an earlier checkpoint or retrain"
    end = raw.rfind(_ZIP_END, max(len(raw) - _ZIP_END_SEARCH, 0))
    if end < 0 or end + 22 + int.from_bytes(raw[end + 20: end + 22], "little") > len(raw):  # 22: the record's size
        raise CheckpointError(f"{path} is truncated (its zip directory, at the end, is missing); {retry}")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            name = _record_name(zf)
            digest = _digest(zf)
            record = json.loads(zf.read(name)) if name in zf.NameToInfo else None
    except Exception as err:  # any failure to read the archive means damage (bad CRC, directory, header, JSON...)
        raise CheckpointError(f"{path} is corrupted ({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
                              f"{retry}") from None
    if record is None and MAGIC.encode() in raw:  # ours, but the record's name is damaged
        raise CheckpointError(f"{path} is corrupted (its {RECORD} record cannot be found); {retry}")
    if record is None:
        raise CheckpointError(f"{path} is not an apart_fast checkpoint (a torch archive without its {RECORD} record); "
                              "pass a file written by apart-fast train")
    if not (isinstance(record, dict) and record.get("magic") == MAGIC and isinstance(record.get("format"), int)
            and isinstance(record.get("sha256"), str)):
        raise CheckpointError(f"{path} has a damaged {RECORD} record (corrupted); {retry}")
    if record["format"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {record['format']}, newer than this apart_fast ({FORMAT_VERSION}); "
                              "upgrade apart_fast")
    if digest != record["sha256"]:
        raise CheckpointError(f"{path} fails its checksum (corrupted); {retry}")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by ``save`` (format 2, or format 1 from earlier versions), verifying it before unpickling."""
    path = Path(path)
    if path.is_dir():
        inside = [f for f in ("model.pt", "checkpoint.pt") if (path / f).is_file()]
        hint = f"pass {path / inside[0]}" if inside else "pass a model.pt or checkpoint.pt written by apart-fast train"
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a model.pt or checkpoint.pt written by apart-fast train")
    raw = path.read_bytes()
    if not raw.startswith(b"{") and (raw.startswith(_ZIP_START) or _ZIP_END in raw[-_ZIP_END_SEARCH:]):
        _check_format2(path, raw)
        body = raw
    else:
        body = _format1_body(path, raw)
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as err:  # records intact but unreadable: a damaged zip directory, or another torch/apart_fast wrote it
        raise CheckpointError(f"{path} cannot be read by torch.load ({type(err).__name__}: {' '.join(str(err).split())[:100]}); "
                              "it is corrupted or was written by another torch: use an earlier checkpoint, or load it "
                              "with the apart_fast and torch versions that wrote it") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint; pass a file written by apart-fast train")
    return payload
