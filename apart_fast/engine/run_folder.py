"""Who owns an output folder: the one process running there (an advisory lock) and the files a run wrote.

- ``FolderLock``: ``fcntl.flock`` on ``OUT/.apart-fast.lock`` for the life of a run. The OS releases it when the
  process dies, so ``kill -9`` leaves no stale lock; a second process is refused with one line naming the holder's pid.
- A folder holds a run once it holds a file written by ``checkpoint.save`` (``run_files``). ``START`` marks the run
  files beside it as written by a start that has not reached its first checkpoint (one that failed or was killed):
  the next start may replace them. Files named like a run's without either are the user's and are never deleted.
- ``BACKUP``: where ``--overwrite`` keeps the run it replaces until the new run has finished an epoch
  (``restore_backup`` puts it back, ``recover`` does so on the next start after a killed ``--overwrite``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from apart_fast.config import ConfigError
from apart_fast.engine.checkpoint import is_run_checkpoint

LOCK = ".apart-fast.lock"
START = ".apart-fast-start"  # a start that has not written its first checkpoint yet
BACKUP = "overwritten-run"
CHECKPOINT_FILES = ("checkpoint.pt", "model.pt", "model_best.pt", "model_ema.pt")
RUN_FILES = ("metrics.jsonl", *CHECKPOINT_FILES, "results.json", "config.json")


def _warn(msg: str) -> None:
    print(f"apart-fast: warning: {msg}", file=sys.stderr)


class FolderLock:
    """An exclusive advisory lock on ``folder`` (its ``LOCK`` file) for one process; ``release`` removes the file."""

    def __init__(self, folder: str | Path, flag: str = "--out") -> None:
        self.folder, self.flag = Path(folder), flag  # flag: how error lines name the folder
        self.fd: int | None = None
        self.held = False  # True once acquired (also on a filesystem without locks, after a warning said so)

    def acquire(self) -> None:
        """Take the lock (the folder must exist), or raise ConfigError naming the pid of the process holding it."""
        if self.held:
            return
        path = self.folder / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise ConfigError(f"{self.flag} {self.folder} is not writable ({err.strerror}); pass a folder you can "
                                  "write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _pid_in(fd)
                os.close(fd)
                raise ConfigError(f"{self.flag} {self.folder} is in use by another apart-fast process (pid {pid}); wait "
                                  f"for it to finish or stop it (kill {pid}), or pass another {self.flag}") from None
            except OSError as err:  # a filesystem without locks (some network mounts)
                os.close(fd)
                _warn(f"cannot lock {self.folder} ({err.strerror}); nothing stops a second process from writing there")
                self.held = True
                return
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the last holder removed the file between our open and our lock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd, self.held = fd, True

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing it first, so no waiter locks a file about to vanish)."""
        if self.fd is not None:
            try:
                (self.folder / LOCK).unlink(missing_ok=True)
            finally:
                os.close(self.fd)
        self.fd, self.held = None, False


def _pid_in(fd: int) -> str:
    """The pid a lock holder wrote into its lock file ('unknown' while it has not written it yet)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def run_files(folder: Path) -> list[str]:
    """The checkpoint files in ``folder`` that a run wrote (``checkpoint.save``'s header): it holds a run if any."""
    return [f for f in CHECKPOINT_FILES if is_run_checkpoint(folder / f)]


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` named like a run's that no run wrote: a ``.pt`` without our header, and the other run
    files unless a run's checkpoint, a start marker or an ``--overwrite``'s backup of a run sits beside them. A run
    never replaces or deletes these."""
    present = [f for f in RUN_FILES if (folder / f).exists()]
    ours = set(run_files(folder))
    if ours or (folder / START).exists() or run_files(folder / BACKUP):
        return [f for f in present if f.endswith(".pt") and f not in ours]
    return present


def leftovers(folder: Path) -> list[str]:
    """The run files a start that never reached its first checkpoint left in ``folder`` (none unless ``START``)."""
    if not (folder / START).exists() or run_files(folder):
        return []
    return [f for f in RUN_FILES if (folder / f).exists()]


def discard_start(folder: Path) -> None:
    """Remove what a start that wrote no checkpoint left in ``folder`` (its run files and ``START``)."""
    for f in leftovers(folder):
        (folder / f).unlink()
    (folder / START).unlink(missing_ok=True)


def backup_pending(folder: Path) -> bool:
    """Whether ``--overwrite`` still keeps the run it replaces in ``BACKUP`` (the new run has not finished an epoch)."""
    return (folder / BACKUP).is_dir()


def drop_backup(folder: Path) -> None:
    """Delete the run ``--overwrite`` replaced, once the new run has finished an epoch."""
    if backup_pending(folder):
        shutil.rmtree(folder / BACKUP)


def restore_backup(folder: Path) -> bool:
    """Settle a pending ``--overwrite`` whose new run stopped: before its first checkpoint (written at the end of its
    first epoch) the old run is put back in place of the new run's files (True); after it the old run is deleted."""
    backup = folder / BACKUP
    if not backup.is_dir():
        return False
    if is_run_checkpoint(folder / "checkpoint.pt"):
        drop_backup(folder)
        return False
    keep = foreign_files(folder)
    for f in RUN_FILES:
        if f not in keep:
            (folder / f).unlink(missing_ok=True)
    (folder / START).unlink(missing_ok=True)
    for f in backup.iterdir():
        os.replace(f, folder / f.name)
    backup.rmdir()
    return True


def recover(folder: Path) -> None:
    """Settle what a killed ``--overwrite`` left in ``folder`` (``restore_backup``); call it with the lock held, so
    the process that was overwriting is gone."""
    if restore_backup(folder):
        _warn(f"{folder}: an --overwrite stopped before its new run finished an epoch; the run it was replacing "
              f"(kept in {BACKUP}/) is back in place")
