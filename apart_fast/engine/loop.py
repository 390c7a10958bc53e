"""The training loop: data on the device, one method step per batch, metrics read only at log intervals,
a held-out evaluation and a full checkpoint after every epoch, exact resume.

Reliability (see ``faults.py`` and ``step/guard.py``):

- Interruption: the first SIGINT/SIGTERM lets the current step finish, then ``checkpoint.pt`` is
  written *at step granularity* and ``TrainingInterrupted`` (exit code 130/143 in the CLI) says how
  to resume. A mid-epoch checkpoint records the loader's state from before the epoch's draw, the
  index of the next step in the epoch and the epoch's running sums, so ``--resume`` redraws the
  same epoch, skips the batches already done and continues the same run bit for bit.
- ``kill -9`` at any moment: every file is written atomically, so ``checkpoint.pt`` is always the
  last complete one; resume trims ``metrics.jsonl`` back to it and removes stale temporary files.
- Numeric faults: a step whose loss or gradients are not finite is undone on the device (no
  per-step sync), logged with its global step to ``metrics.jsonl`` and stderr when the flags are
  read (every ``log_interval`` steps), and ``max_faults`` of them stop the run with
  ``NumericFaultError``.
- Bad input: everything (config, data, output folder, resume checkpoint) is checked before the
  output folder is created or touched, so a failed start writes nothing.

Several processes (``torchrun --nproc_per_node N -m apart_fast train ...``): see ``step/distributed.py``.
Rank 0 alone writes files and prints; every rank evaluates a slice of the held-out/test data; a
stop signal and the fault flags are agreed between ranks at log intervals, so all ranks stop after
the same step.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apart_fast.attacks import evaluate
from apart_fast.config import Config, ConfigError
from apart_fast.data import DeviceLoader, ImageData, load_dataset
from apart_fast.diagnostics import epoch_probe
from apart_fast.engine import checkpoint
from apart_fast.engine.faults import FaultMonitor, NumericFaultError, StopSignals, TrainingInterrupted
from apart_fast.engine.graphs import GraphStep
from apart_fast.methods import DataInfo, Method, build_method
from apart_fast.models import build_model
from apart_fast.step.amp import Precision
from apart_fast.step.distributed import LOCAL, Comm, ShardLoader
from apart_fast.step.guard import BufferGuard
from apart_fast.step.optim import DeviceSGD
from apart_fast.step.schedule import CyclicSchedule, DeviceSchedule

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
RUN_FILES = ("metrics.jsonl", "checkpoint.pt", "model.pt", "model_best.pt", "results.json", "config.json")


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch.device, refusing CUDA when none is available."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA device is available; use --device cpu")
    return dev


def check_out_dir(out: str | None, resume: bool, overwrite: bool) -> Path | None:
    """The output folder as a Path after checking it can take this run; writes nothing."""
    if out is None:
        if resume:
            raise ConfigError("--resume needs the run's folder; pass --resume DIR")
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    if resume:
        if not (path / "checkpoint.pt").is_file():
            raise ConfigError(f"--resume {out}: no checkpoint.pt there to resume from; train without --resume first")
        return path
    taken = [f for f in RUN_FILES if (path / f).exists()]
    if taken and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({taken[0]}); pass --resume {out}, --overwrite, or another --out")
    return path


def prepare_out_dir(out: str | None, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder (``check_out_dir``), then create it; ``overwrite`` deletes the old run's files."""
    path = check_out_dir(out, resume, overwrite)
    if path is None:
        return None
    if overwrite and not resume:
        for f in RUN_FILES:
            (path / f).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    for tmp in path.glob(".*.tmp"):  # left by a process killed inside an atomic write
        tmp.unlink(missing_ok=True)
    return path


def _warn(msg: str) -> None:
    tqdm.write(f"apart-fast: warning: {msg}", file=sys.stderr)


class Run:
    """Everything one training run holds: data, model, method, optimizers, progress.

    ``model``: a user's model (images in [0,1] -> logits, with ``PerturbSite`` markers for APART)
    instead of ``cfg.model``; without a ``model.config`` its checkpoints hold only the weights
    (``model_config`` None). ``comm``: the process group (``distributed.Comm``), one process by default.
    """

    def __init__(self, cfg: Config, data: ImageData | None = None, model: nn.Module | None = None,
                 comm: Comm | None = None, device: str | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.comm = comm if comm is not None else LOCAL
        self.device = resolve_device(device if device is not None else cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        d = self.data
        n_train = int(d.train_x.shape[0])
        if cfg.batch_size > n_train:
            raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training examples; pass a smaller batch size")
        pad = d.pad if cfg.pad is None else cfg.pad
        flip = d.flip if cfg.flip is None else cfg.flip
        mean, std = (CIFAR_MEAN, CIFAR_STD) if cfg.normalize and d.channels == 3 else (None, None)
        if model is None:
            model = build_model(cfg.model, num_classes=d.num_classes, in_channels=d.channels, width=cfg.width,
                                mean=mean, std=std)
        self.user_model = not hasattr(model, "config")
        cuda = self.device.type == "cuda"
        if cfg.sync_bn and self.comm.distributed and cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algorithms once
        if cfg.channels_last if cfg.channels_last is not None else cuda:
            self.model.to(memory_format=torch.channels_last)
        self.comm.broadcast_([*self.model.parameters(), *self.model.buffers()])  # the same start on every rank
        self.loader: DeviceLoader = ShardLoader(
            d.train_x, d.train_y, cfg.batch_size, device=self.device, pad=pad, pad_mode=cfg.pad_mode,
            pad_value=cfg.pad_value, flip=flip, ragged="drop", seed=cfg.seed, rank=self.comm.rank, world=self.comm.world,
        )
        h, w = d.image_size
        info = DataInfo(n_train=n_train, channels=d.channels, height=h, width=w, pad=pad)
        self.method: Method = build_method(cfg.method, self.model, cfg, info, self.device)
        # CUDA graphs (graphs.py): one process, a method whose step is capturable; --cuda-graphs on a
        # CPU runs the same static-buffer step eagerly (its optimizer and schedule use device tensors).
        auto_graphs = cuda and self.method.capturable and not self.comm.distributed
        self.graphs = bool(cfg.cuda_graphs if cfg.cuda_graphs is not None else auto_graphs)
        if self.graphs and (not self.method.capturable or self.comm.distributed):
            raise ConfigError(f"--cuda-graphs: method {cfg.method} or a run with several processes cannot be "
                              "captured; pass --no-cuda-graphs")
        self.precision = Precision(cfg.amp, self.device, cache=not self.graphs)
        self.method.use(self.precision, self.comm)
        if cfg.compile:
            self.method.model = torch.compile(self.model)  # the engine keeps the plain module for checkpoints
        store = getattr(self.method, "store", None)
        self.comm.broadcast_([*getattr(self.method, "step_sizes", list)(), *([store] if store is not None else [])])
        self.epochs = math.ceil(cfg.epochs / self.method.data_passes_divisor)
        steps = self.epochs * len(self.loader)
        params = list(self.model.parameters()) + self.method.extra_model_params()
        opt_cls, sched_cls = (DeviceSGD, DeviceSchedule) if self.graphs else (torch.optim.SGD, CyclicSchedule)
        self.optimizer = opt_cls(params, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        replays = self.method.data_passes_divisor
        self.schedule = sched_cls(self.optimizer, steps * replays, cfg.lr, (cfg.momentum, cfg.momentum_low))
        self.method.attach(self.optimizer, self.schedule, steps)
        g = torch.Generator().manual_seed(cfg.seed + 3)
        n_test = int(d.test_x.shape[0])
        self.holdout = torch.randperm(n_test, generator=g)[: min(cfg.eval_n, n_test)]
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # completed steps of the epoch in progress (0 at a boundary)
        self.step_count = 0  # completed steps of the run
        self.train_seconds = 0.0
        self.best_robust, self.best_epoch = -1.0, 0  # held-out robust accuracy of model_best.pt
        self.buffers = BufferGuard(self.model)
        gens = [self.method.generator] if cuda else []
        self.stepper = GraphStep(self.step, capture=self.graphs and cuda, generators=gens) if self.graphs else None
        self.faults = FaultMonitor(self.device, cfg.log_interval)
        self.out: Path | None = None  # where fault events are logged (set by ``train``)
        self._epoch_loader: dict[str, Any] | None = None  # loader state before the current epoch's draw
        self._sums: dict[str, torch.Tensor] = {}

    @property
    def model_config(self) -> dict[str, Any] | None:
        """How ``load_model`` rebuilds the model; None for a user's model without ``config``."""
        return getattr(self.model, "config", None)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly, at an epoch boundary or mid-epoch.

        Called on every rank (it averages BatchNorm statistics and gathers per-rank state); rank 0 writes it.
        """
        mid = self.step_in_epoch > 0
        self.comm.average_buffers(self.model)
        rank_states = self.comm.gather_objects(self.method.rank_state())
        return {
            "kind": "full",
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "method": self.method.state_dict(),
            "loader": self._epoch_loader if mid else self.loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step_count": self.step_count,
            "epoch_sums": dict(self._sums) if mid else {},
            "faults": self.faults.state_dict(),
            "train_seconds": self.train_seconds,
            "best": [self.best_robust, self.best_epoch],
            "precision": self.precision.state_dict(),
            "world": self.comm.world,
            "rank_states": rank_states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a full checkpoint (``state_dict``); refuses one of another model or a model.pt."""
        if state.get("kind") != "full":
            raise checkpoint.CheckpointError("resume needs checkpoint.pt (a full checkpoint), not model.pt")
        saved_cfg, cfg = state["model_config"], self.model_config
        if (saved_cfg is None) != (cfg is None):
            raise checkpoint.CheckpointError(
                "checkpoint holds a user-defined model, pass the same model to train()" if saved_cfg is None
                else "checkpoint holds a built-in model; resume it without passing model= (or with a model of that config)")
        if saved_cfg != cfg:
            raise checkpoint.CheckpointError(
                f"checkpoint holds model {saved_cfg['name']} {saved_cfg['kwargs']}, "
                f"this run builds {cfg['name']} {cfg['kwargs']}; pass the same --model/--width"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.method.load_state_dict(state["method"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng_cpu"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.step_count = int(state.get("step_count", self.epoch * len(self.loader)))
        self._sums = {k: v.to(self.device) for k, v in state.get("epoch_sums", {}).items()}
        self._epoch_loader = state["loader"] if self.step_in_epoch else None
        if "faults" in state:
            self.faults.load_state_dict(state["faults"])
        self.train_seconds = float(state["train_seconds"])
        self.best_robust, self.best_epoch = float(state["best"][0]), int(state["best"][1])
        if "precision" in state:
            self.precision.load_state_dict(state["precision"])
        # Per-rank state (random-start generators, Free's perturbation): this rank's, when the
        # checkpoint was written by at least rank+1 processes; else the fresh per-rank seed stays.
        ranks = state.get("rank_states") or []
        if self.comm.world > 1 or len(ranks) > 1:
            self.method.load_rank_state(ranks[self.comm.rank] if self.comm.rank < len(ranks) else None)

    def model_payload(self) -> dict[str, Any]:
        """What ``load_model`` needs: the model's constructor config and weights, plus provenance."""
        return {
            "kind": "model",
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "method": self.cfg.method,
            "epoch": self.epoch,
        }

    def read_faults(self) -> None:
        """Read the on-device fault flags (one sync), log each skipped step, stop after ``max_faults``."""
        bad = self.faults.read()
        for s in bad:
            if self.comm.is_main:
                _warn(f"non-finite loss or gradient at step {s} (epoch {self.epoch + 1}); update skipped "
                      f"({self.faults.total} of --max-faults {self.cfg.max_faults})")
        if bad and self.out is not None and self.comm.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                for s in bad:
                    f.write(json.dumps({"event": "nonfinite", "step": s, "epoch": self.epoch + 1}) + "\n")
        if self.faults.total >= self.cfg.max_faults:
            steps = ", ".join(map(str, self.faults.steps[-5:]))
            raise NumericFaultError(
                f"stopped after {self.faults.total} non-finite steps (last at steps {steps}); each update was "
                f"skipped, so the weights stayed finite; lower --lr/--apart-lr or check the data for NaN"
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
        bar = tqdm(self.loader, desc=f"{self.cfg.method} epoch {self.epoch + 1}/{self.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
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
            if progress and (i + 1) % self.cfg.log_interval == 0:
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
                 progress: bool = False) -> dict[str, Any]:
        """Clean and PGD accuracy (float32, eval mode); several ranks evaluate a slice each and combine."""
        cfg, comm = self.cfg, self.comm
        comm.average_buffers(self.model)  # every rank evaluates the same model
        if comm.distributed:
            x, y = x[comm.rank::comm.world], y[comm.rank::comm.world]
        if x.shape[0] == 0:
            ev: dict[str, Any] = {"clean_acc": 0.0, "robust_acc": 0.0 if steps else None, "n": 0}
        else:
            ev = evaluate(self.model, x, y, batch_size=max(cfg.batch_size, 256), eps=cfg.eval_eps, step=cfg.eval_step,
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


def _load_resume(out: Path) -> dict[str, Any]:
    """checkpoint.pt of ``out``, checked to be a full checkpoint with a readable config."""
    path = out / "checkpoint.pt"
    saved = checkpoint.load(path)
    if not isinstance(saved, dict) or saved.get("kind") != "full" or "config" not in saved:
        raise checkpoint.CheckpointError(f"{path} is not a full training checkpoint; pass the folder of an apart-fast train run")
    try:
        Config.from_dict(saved["config"]).validate()
    except (TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(f"{path} holds a config this apart_fast cannot read ({err}); "
                                         "resume it with the apart_fast version that wrote it") from None
    return saved


def _trim_metrics(out: Path, run: Run) -> list[dict[str, Any]]:
    """Drop metrics.jsonl lines past the checkpoint (a kill -9 can leave some) and return the kept epoch records."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    kept, history = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        step = rec.get("step")
        if step > run.step_count if step is not None else rec.get("epoch", 0) > run.epoch:
            continue
        kept.append(line)
        if "event" not in rec:
            history.append(rec)
    checkpoint.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return history


def _interrupted(run: Run, out: Path | None, stop: StopSignals, saved: bool) -> TrainingInterrupted:
    """The exception that ends an interrupted run, its message saying where the run stands and how to resume."""
    name = {130: "SIGINT", 143: "SIGTERM"}.get(stop.exit_code, f"signal {stop.signum}")
    where = (f"epoch {run.epoch + 1}, step {run.step_in_epoch}/{len(run.loader)}" if run.step_in_epoch
             else f"the end of epoch {run.epoch}")
    if out is None:
        return TrainingInterrupted(f"interrupted by {name} at {where}; no --out was given, so nothing was saved",
                                   stop.exit_code)
    if not saved and not (out / "checkpoint.pt").exists():
        return TrainingInterrupted(f"interrupted by {name} before the first checkpoint; nothing to resume, "
                                   f"start again with --overwrite --out {out}", stop.exit_code)
    what = f"checkpoint.pt saved at {where}" if saved else "checkpoint.pt holds the last complete checkpoint"
    return TrainingInterrupted(f"interrupted by {name}; {what}; resume with: apart-fast train --resume {out}",
                               stop.exit_code)


def _save_checkpoint(run: Run, out: Path, model_too: bool = False, best: bool = False) -> None:
    """checkpoint.pt (and model.pt / model_best.pt), built on every rank, written by rank 0."""
    state = run.state_dict()
    if not run.comm.is_main:
        return
    if best:
        checkpoint.save(out / "model_best.pt", run.model_payload())
    checkpoint.save(out / "checkpoint.pt", state)
    if model_too:
        checkpoint.save(out / "model.pt", run.model_payload())


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data: ImageData | None = None, model: nn.Module | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return the final results; with ``cfg.out`` set, write metrics and checkpoints there.

    ``resume`` continues the run in ``cfg.out`` from its checkpoint.pt with the saved config (only
    ``epochs`` may grow). ``model``: a user's model instead of ``cfg.model`` (see ``Run``; pass it
    again to resume). Under torchrun (``WORLD_SIZE`` > 1) the processes train one model data-parallel
    (``step/distributed.py``) and rank 0 writes; a checkpoint resumes on any number of processes.
    Raises ``TrainingInterrupted`` after SIGINT/SIGTERM (checkpoint written), ``NumericFaultError``
    after ``cfg.max_faults`` non-finite steps, ConfigError/DataError/CheckpointError on bad input,
    in which case nothing has been written.
    """
    cfg.validate()
    comm, device = Comm.from_env(cfg.device)
    try:
        return _train(cfg, comm, device, resume, overwrite, progress, data, model)
    finally:
        comm.close()


def _train(cfg: Config, comm: Comm, device: str, resume: bool, overwrite: bool, progress: bool,
           data: ImageData | None, model: nn.Module | None) -> dict[str, Any]:
    """``train`` inside its process group."""
    progress = progress and comm.is_main
    out = check_out_dir(cfg.out, resume, overwrite)
    saved = None
    if resume:
        assert out is not None
        saved = _load_resume(out)
        epochs = cfg.epochs
        cfg = Config.from_dict(saved["config"])
        cfg.epochs, cfg.out = max(epochs, cfg.epochs), str(out)
    run = Run(cfg, data, model=model, comm=comm, device=device)
    if saved is not None:
        run.load_state_dict(saved)
    history: list[dict[str, Any]] = []
    comm.barrier()  # every rank has checked everything before rank 0 writes
    if out is not None:  # everything is checked: from here on the run may write
        run.out = out
        if comm.is_main:
            prepare_out_dir(str(out), resume, overwrite)
            if resume:
                history = _trim_metrics(out, run)
            else:
                checkpoint.atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        elif resume:
            history = comm.broadcast_object(None)
        if comm.is_main and resume:
            comm.broadcast_object(history)
    d = run.data
    hx, hy = d.test_x[run.holdout], d.test_y[run.holdout]
    stop = StopSignals()
    with stop.installed():
        try:
            results = _train_loop(run, out, history, hx, hy, progress, stop)
        except KeyboardInterrupt:  # a second signal, or one during the final evaluation
            if stop.signum is None:
                raise
            raise _interrupted(run, out, stop, saved=False) from None
        except NumericFaultError as err:
            if out is None:
                raise
            if not (out / "checkpoint.pt").exists():  # nothing saved yet: the current state is finite, keep it
                _save_checkpoint(run, out)
            raise NumericFaultError(f"{err}; {out}/checkpoint.pt holds the last good state "
                                    f"(resume with: apart-fast train --resume {out})") from None
    ev = results.pop("_final")
    results.update(test_clean_acc=ev["clean_acc"], test_robust_acc=ev["robust_acc"], test_n=ev["n"],
                   eval=f"PGD-{cfg.final_eval_steps}x{cfg.final_eval_restarts}, eps {cfg.eval_eps:.4g}")
    if out is not None and comm.is_main:
        checkpoint.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    results["model"] = run.model
    return results


def _train_loop(run: Run, out: Path | None, history: list[dict[str, Any]], hx: torch.Tensor, hy: torch.Tensor,
                progress: bool, stop: StopSignals) -> dict[str, Any]:
    """The epochs and the final evaluation; raises TrainingInterrupted once a signal was seen."""
    cfg = run.cfg
    while run.epoch < run.epochs:
        stats = run.train_epoch(progress, stop)
        if stats is None:  # a signal mid-epoch: save the step we stopped after
            if out is not None:
                _save_checkpoint(run, out)
            raise _interrupted(run, out, stop, saved=True)
        rec: dict[str, Any] = {"epoch": run.epoch + 1, "step": run.step_count, **stats}
        run.epoch += 1
        if cfg.eval_n > 0 and (run.epoch % cfg.eval_every == 0 or run.epoch == run.epochs):
            ev = run.evaluate(hx, hy, steps=cfg.eval_steps)
            rec.update(holdout_clean_acc=ev["clean_acc"], holdout_robust_acc=ev["robust_acc"])
        rec.update(run.method.log_values())
        rec.update(epoch_probe(run))
        robust = rec.get("holdout_robust_acc")
        improved = robust is not None and robust > run.best_robust
        if improved:
            run.best_robust, run.best_epoch = robust, run.epoch
        rec.update(best_epoch=run.best_epoch, best_holdout_robust_acc=run.best_robust, skipped_steps=run.faults.total)
        history.append(rec)
        if out is not None:
            if run.comm.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            _save_checkpoint(run, out, model_too=True, best=improved)
        if progress and run.comm.is_main:
            desc = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float) and not k.startswith("a_"))
            tqdm.write(f"[{cfg.method}] epoch {rec['epoch']}: {desc}")
        if run._should_stop(stop, 0):
            raise _interrupted(run, out, stop, saved=True)
    stop.hard = True  # training is complete and saved: a signal now aborts the final evaluation at once
    if run._should_stop(stop, 0):
        raise _interrupted(run, out, stop, saved=False)
    results: dict[str, Any] = {"method": cfg.method, "epochs": run.epochs, "train_seconds": run.train_seconds,
                               "best_epoch": run.best_epoch, "best_holdout_robust_acc": run.best_robust,
                               "passes_per_step": run.method.passes, "steps_per_epoch": len(run.loader),
                               "skipped_steps": run.faults.total, "device": str(run.device), "history": history}
    d = run.data
    results["_final"] = run.evaluate(d.test_x, d.test_y, steps=cfg.final_eval_steps, restarts=cfg.final_eval_restarts,
                                     progress=progress)
    return results
