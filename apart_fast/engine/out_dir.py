"""A run's output folder before anything is written to it: a fresh name when none is given, the checks that it can take
this run (exists or can be created, writable, room for the checkpoints, holds no files a run did not write and no run
unless resumed or overwritten), then, locked, its preparation. Who owns the folder and which files are a run's:
``run_folder.py``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from apart_fast.config import Config, ConfigError
from apart_fast.engine.run_folder import (
    BACKUP,
    RUN_FILES,
    START,
    FolderLock,
    backup_pending,
    discard_start,
    foreign_files,
    recover,
    run_files,
)

AUTO_OUT = "auto"  # Config.out (the CLI's default): a fresh folder named by auto_out_dir


def _existing_ancestor(path: Path, flag: str) -> Path:
    """``path`` or its nearest existing ancestor, which must be a folder (ConfigError otherwise)."""
    probe = path.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"{flag} {path}: {probe} is a symlink to nothing; fix the link or pass another folder")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file, not a folder; pass a folder")
    return probe


def check_writable(path: Path, flag: str = "--out") -> None:
    """ConfigError unless ``path`` (or the folder it would be created in) takes a new file; leaves nothing behind."""
    where = _existing_ancestor(path, flag)
    try:
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".apart-fast-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ConfigError(f"{flag} {path} is not writable ({err.strerror} in {where}); pass a folder you can write to") from None


def check_free_space(path: Path, need: int, flag: str = "--out") -> None:
    """ConfigError unless the disk holding ``path`` has ``need`` bytes free."""
    where = _existing_ancestor(path, flag)
    free = shutil.disk_usage(where).free
    if free < need:
        raise ConfigError(f"{flag} {path}: {free / 2**20:.1f} MiB free on its disk but this run's checkpoints need about "
                          f"{need / 2**20:.1f} MiB; free some space or pass a folder on another disk")


def auto_out_dir(cfg: Config, root: Path = Path("runs")) -> str:
    """A fresh folder for a run given no output folder: ``runs/<method>-<dataset>-<date-time>``, with -2, -3... if taken."""
    base = root / f"{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def check_out_dir(out: str | None, resume: bool, overwrite: bool) -> Path | None:
    """The output folder as a Path after checking it can take this run (exists or can be created, writable, holds
    no files a run did not write, holds no run unless ``resume`` or ``overwrite``); writes nothing."""
    if out is None:
        if resume:
            raise ConfigError("--resume needs the run's folder; pass --resume DIR")
        return None
    path = Path(out)
    flag = "--resume" if resume else "--out"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {out} is a file; pass a folder")
    if resume:
        if not (path / "checkpoint.pt").is_file():
            hint = ("its start stopped before the first checkpoint; train into it again without --resume (what that start "
                    "left is replaced)" if (path / START).exists() else "train without --resume first")
            raise ConfigError(f"--resume {out}: no checkpoint.pt there to resume from; {hint}")
    else:
        foreign = foreign_files(path)
        if foreign:
            raise ConfigError(f"--out {out} holds {', '.join(foreign)} but no run of apart-fast wrote them (no checkpoint "
                              "beside them); move them away or pass another --out: a run never replaces files it did not write")
        taken = run_files(path) + ([BACKUP] if backup_pending(path) else [])  # a backup: a run an --overwrite was replacing
        if taken and not overwrite:
            raise ConfigError(f"--out {out} already holds a run ({taken[0]}); pass --resume {out}, --overwrite, "
                              "or another --out")
        backup = path / BACKUP
        if backup.exists() and not backup.is_dir():
            raise ConfigError(f"--out {out}: {backup} is a file; remove it (apart-fast keeps an overwritten run there)")
    check_writable(path, flag)
    return path


def prepare_out_dir(out: str | None, resume: bool, overwrite: bool, lock: FolderLock | None = None) -> bool:
    """Create the output folder, lock it (``lock``), check it again under the lock (``check_out_dir``) and clear what a
    start that never reached a checkpoint left; a new run then marks the folder (``START``) and ``overwrite`` moves
    the old run into ``BACKUP`` (see ``run_folder``). Returns whether a run was moved there."""
    path = check_out_dir(out, resume, overwrite)
    if path is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
    recover(path)
    check_out_dir(out, resume, overwrite)  # again, locked: another process may have started here meanwhile
    for tmp in path.glob(".*.tmp"):  # left by a process killed inside an atomic write
        tmp.unlink(missing_ok=True)
    if resume:
        return False
    discard_start(path)
    present = [f for f in RUN_FILES if (path / f).exists()]
    if overwrite and present:
        backup = path / BACKUP
        shutil.rmtree(backup, ignore_errors=True)
        backup.mkdir()
        for f in present:
            os.replace(path / f, backup / f)
    (path / START).write_bytes(f"{os.getpid()}\n".encode())
    return bool(overwrite and present)


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what creating ``path`` would make)."""
    made = []
    probe = path.absolute()
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    return made
