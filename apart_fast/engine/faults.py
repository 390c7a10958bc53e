"""Numeric faults and interruption as the loop sees them, without a per-step host sync.

Numeric faults: every update is kept or undone on the device by the step itself (``step.guard``),
so a non-finite step leaves the weights, the optimizer state, the BatchNorm buffers and APART's
step sizes and omega store bit-identical to before it. The flags of the last ``window`` steps sit
in a device tensor that the loop reads once per log interval (``FaultMonitor.read``): that is the
only sync, and it names the step of every skipped update.

Interruption: ``StopSignals`` turns the first SIGINT/SIGTERM into a flag the loop checks between
steps (the current step finishes, a checkpoint is written); a second signal aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
from torch import Tensor
from tqdm.auto import tqdm

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them


class NumericFaultError(RuntimeError):
    """Too many non-finite steps: the run stopped; the message names the steps and the checkpoint."""


class RunFailedError(RuntimeError):
    """The run stopped midway on an OSError (a full disk, say) or out of memory; the message names the checkpoint it left."""


def warn(msg: str) -> None:
    """One warning line on stderr (``apart-fast: warning: ...``), written past any progress bar."""
    tqdm.write(f"apart-fast: warning: {msg}", file=sys.stderr)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` reports an exhausted host or device memory (torch's CPU allocator raises a plain RuntimeError)."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class TrainingInterrupted(Exception):  # noqa: N818 - it is a normal outcome, not an error
    """SIGINT/SIGTERM stopped training after a checkpoint was written; ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FaultMonitor:
    """Per-step fault flags kept on the device; ``read`` syncs once and returns the faulty global steps."""

    def __init__(self, device: torch.device, window: int) -> None:
        self.window = max(int(window), 1)
        self.flags = torch.zeros(self.window, dtype=torch.bool, device=device)
        self.start = 0  # global step of flags[0]
        self.pending = 0  # steps recorded since the last read
        self.total = 0  # faults read so far in this run
        self.steps: list[int] = []  # their global steps (1-based)

    def record(self, step: int, ok: Tensor) -> None:
        """Note step ``step`` (1-based global index); call ``read`` before ``window`` steps accumulate."""
        if self.pending == 0:
            self.start = step
        self.flags[step - self.start].copy_(~ok)
        self.pending += 1

    def full(self) -> bool:
        """Whether ``window`` steps are pending, so ``read`` must run before the next ``record``."""
        return self.pending >= self.window

    def read(self) -> list[int]:
        """Global steps of the faults recorded since the last read (one host sync), and reset."""
        if self.pending == 0:
            return []
        bad = [self.start + int(i) for i in self.flags.nonzero().flatten().tolist()]
        self.flags.zero_()
        self.pending = 0
        self.total += len(bad)
        self.steps.extend(bad)
        return bad

    def state_dict(self) -> dict:
        return {"total": self.total, "steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.steps = int(state["total"]), [int(s) for s in state["steps"]]


class StopSignals:
    """First SIGINT/SIGTERM sets ``signum`` for the loop to act on between steps; a second one (or
    any while ``hard`` is set) raises KeyboardInterrupt at once. Handlers are installed only in
    the main thread and restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.hard = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if self.hard or not first:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle SIGINT/SIGTERM inside the block (main thread only), restoring the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in EXIT_CODES}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @property
    def exit_code(self) -> int:
        """The process exit code for the signal seen: 130 SIGINT, 143 SIGTERM, 128+N otherwise."""
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + int(self.signum)) if self.signum else 130
