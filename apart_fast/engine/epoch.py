"""What a run does each epoch: its steps (the method's step inside the BatchNorm and fault guard, replayed from a CUDA
graph where captured), running sums kept on the device and read with the fault flags at log intervals, a stop agreed
between ranks, and the held-out evaluation."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apart_fast.attacks import evaluate
from apart_fast.engine.faults import NumericFaultError, StopSignals, warn


class RunEpochs:
    """The training half of ``Run`` (run.py), which sets every attribute used here."""

    def read_faults(self) -> None:
        """Read the on-device fault flags (one sync), log each skipped step, stop after ``max_faults``."""
        bad = self.faults.read()
        for s in bad:
            if self.comm.is_main:
                warn(f"non-finite loss or gradient at step {s} (epoch {self.epoch + 1}); update skipped "
                     f"({self.faults.total} of --max-faults {self.cfg.max_faults})")
        if bad and self.out is not None and self.comm.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                for s in bad:
                    f.write(json.dumps({"event": "nonfinite", "step": s, "epoch": self.epoch + 1}) + "\n")
        now = self.faults.total - self.faults_before
        if now >= self.cfg.max_faults:
            steps = ", ".join(map(str, self.faults.steps[-5:]))
            raise NumericFaultError(
                f"stopped after {now} non-finite steps (last at steps {steps}); each of their updates was undone"
            )

    def train_epoch(self, progress: bool, stop: StopSignals | None = None) -> dict[str, float] | None:
        """One pass over the data (or the rest of one, after a mid-epoch resume).

        Running sums stay on the device and are read every ``log_interval`` steps with the fault
        flags. Returns None when ``stop`` was signalled before the epoch's last step: the run's state
        is then consistent mid-epoch and ``state_dict`` checkpoints it.
        """
        self.model.train()
        skip = self.step_in_epoch
        if skip == 0:
            self._epoch_loader = self.loader.state_dict()
            self._sums = {}
        else:  # resumed mid-epoch: the loader holds the state before this epoch's draw
            self.loader.load_state_dict(self._epoch_loader)
        sums = self._sums
        n_steps = len(self.loader)
        progress = progress and self.comm.is_main
        bar = tqdm(self.loader, desc=f"{self.cfg.method} epoch {self.epoch + 1}/{self.epochs}", leave=False,
                   disable=None if progress else True, dynamic_ncols=True)  # None: no bar when stderr is not a terminal
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        stopped = False
        for i, batch in enumerate(bar):
            if i < skip:
                continue
            m, ok, fault = self.stepper(batch) if self.stepper is not None else self.step(batch)
            self.step_count += 1
            self.step_in_epoch = i + 1
            self.faults.record(self.step_count, ~fault)
            for k, v in m.items():
                v = torch.where(ok, v, torch.zeros_like(v))  # a skipped step adds nothing (its loss may be NaN)
                sums[k] = sums[k] + v if k in sums else v.clone()
            if self.faults.full():
                self.read_faults()
            if not bar.disable and (i + 1) % self.cfg.log_interval == 0:
                n = max(float(sums["n"]), 1.0)
                bar.set_postfix(loss=f"{float(sums['loss']) / n:.3f}", acc=f"{float(sums['correct']) / n:.3f}")
            if stop is not None and i + 1 < n_steps and self._should_stop(stop, i + 1):
                stopped = True
                break
        bar.close()
        if sync:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        self.train_cpu_seconds += time.process_time() - cpu0
        self.read_faults()
        if stopped:
            return None
        self.step_in_epoch = 0
        keys = ("loss", "correct", "n")
        loss, correct, n = (sum(vals) for vals in zip(*self.comm.gather_objects([float(sums.get(k, 0.0)) for k in keys])))
        nan = float("nan")
        return {"train_loss": loss / n if n else nan, "train_acc": correct / n if n else nan, "seconds": seconds}

    def step(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One method step with the BatchNorm guard: (metric sums, keep flag, fault flag), all on the device."""
        self.buffers.snapshot()
        m = self.method.step(batch)
        ok = getattr(self.method, "step_ok", None)
        if ok is None:
            ok = torch.ones((), dtype=torch.bool, device=self.device)
        self.buffers.restore_unless(ok)
        if self.ema is not None:
            self.ema.update()  # a skipped step left the model as it was: averaging it in again is harmless
        fault = getattr(self.method, "step_fault", None)
        return m, ok, (~ok if fault is None else fault)

    def _should_stop(self, stop: StopSignals, done: int) -> bool:
        """Whether to stop after ``done`` steps of the epoch. One process: as soon as a signal came. Several:
        torchrun signals every rank, but not at the same step, so the ranks agree at log intervals."""
        if not self.comm.distributed:
            return stop.signum is not None
        if done % self.cfg.log_interval:
            return False
        agreed = self.comm.agree(stop.signum is not None)
        if agreed and stop.signum is None:
            stop.signum = signal.SIGTERM  # another rank was signalled
        return agreed

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, steps: int, restarts: int = 1, loss: str = "ce",
                 progress: bool = False, model: nn.Module | None = None) -> dict[str, Any]:
        """Clean and PGD accuracy (float32, eval mode) of ``model`` (default the trained one); several ranks
        evaluate a slice each and combine."""
        cfg, comm = self.cfg, self.comm
        model = self.model if model is None else model
        comm.average_buffers(model)  # every rank evaluates the same model
        if comm.distributed:
            x, y = x[comm.rank::comm.world], y[comm.rank::comm.world]
        if x.shape[0] == 0:
            ev: dict[str, Any] = {"clean_acc": 0.0, "robust_acc": 0.0 if steps else None, "n": 0}
        else:
            ev = evaluate(model, x, y, batch_size=max(cfg.batch_size, 256), eps=cfg.eval_eps, step=cfg.eval_step,
                          steps=steps, restarts=restarts, loss=loss, device=self.device,
                          progress=progress and comm.is_main, seed=cfg.seed + 104729 * comm.rank, backend=cfg.backend)
        if not comm.distributed:
            return ev
        parts = comm.gather_objects(ev)
        n = sum(p["n"] for p in parts)
        out = {"clean_acc": sum(p["clean_acc"] * p["n"] for p in parts) / n, "n": n, "robust_acc": None}
        if parts[0]["robust_acc"] is not None:
            out["robust_acc"] = sum(p["robust_acc"] * p["n"] for p in parts) / n
        return out
