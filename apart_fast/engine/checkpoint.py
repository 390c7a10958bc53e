"""Checkpoint files: atomic writes (temp file, fsync, rename), a format version and a checksum.

Layout: one header line of JSON (magic, format version, payload length, payload sha256), then the
payload, a ``torch.save`` of plain containers and tensors read back with ``weights_only=True``.
A truncated, corrupted or foreign file gives a one-line ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

MAGIC = "apart_fast-checkpoint"
FORMAT_VERSION = 1


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


def is_run_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a file written by ``save`` (any format version), judged by its header alone: how a
    folder is recognised as a run's, cheaply and without trusting a file's name."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline(4096))
    except (OSError, ValueError):  # missing, a folder, unreadable, or not our JSON header
        return False
    return isinstance(header, dict) and header.get("magic") == MAGIC


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise ``payload`` with a header carrying the format version and the payload's sha256."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = {"magic": MAGIC, "format": FORMAT_VERSION, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    atomic_write_bytes(path, json.dumps(header).encode() + b"\n" + body)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by ``save``, verifying header, length and checksum first."""
    path = Path(path)
    if path.is_dir():
        inside = [f for f in ("model.pt", "checkpoint.pt") if (path / f).is_file()]
        hint = f"pass {path / inside[0]}" if inside else "pass a model.pt or checkpoint.pt written by apart-fast train"
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a model.pt or checkpoint.pt written by apart-fast train")
    with open(path, "rb") as f:
        first = f.readline(4096)
        try:
            header = json.loads(first)
            ok = (isinstance(header, dict) and header.get("magic") == MAGIC and isinstance(header.get("format"), int)
                  and isinstance(header.get("length"), int) and isinstance(header.get("sha256"), str))
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            if first and not first.endswith(b"\n") and first.startswith(b'{"magic": "' + MAGIC.encode()):
                raise CheckpointError(f"{path} is truncated inside its header; use an earlier checkpoint or retrain")
            raise CheckpointError(f"{path} is not an apart_fast checkpoint; pass a file written by apart-fast train")
        if header["format"] > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format {header['format']}, newer than this apart_fast ({FORMAT_VERSION}); upgrade apart_fast"
            )
        body = f.read()
    if len(body) != header["length"]:
        raise CheckpointError(f"{path} is truncated ({len(body)} of {header['length']} bytes); use an earlier checkpoint or retrain")
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{path} fails its checksum (corrupted); use an earlier checkpoint or retrain")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as err:  # checksum fine but unreadable: written by an incompatible torch/apart_fast
        raise CheckpointError(f"{path} cannot be unpickled ({type(err).__name__}); "
                              "load it with the apart_fast and torch versions that wrote it") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint; pass a file written by apart-fast train")
    return payload
