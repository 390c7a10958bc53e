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
- Bad input: one validation phase (``_train`` up to ``prepare_out_dir``) checks the config, the
  data (read and decoded in full), the model against two images, the output folder (writable, room for a
  checkpoint), the device and backend (one kernel launched) and, on resume, the checkpoint against this
  run (its own config, ``RESUME_MAY_CHANGE``, the data's fingerprint) before the output folder is created
  or written: a failed start writes nothing.
- The output folder (``run_folder.py``): rank 0 locks it for the run's life, so a second process there is refused;
  it holds a run once it holds a checkpoint, and a start that stops before its first one leaves nothing (or, after
  kill -9, a marker the next start recognises). ``--overwrite`` moves the old run into ``<out>/overwritten-run/`` and
  deletes it only once the new run finished an epoch; a new run that stops before that puts the old one back.
- Failing midway (``OSError`` such as a full disk, out of memory): ``RunFailedError`` names the
  checkpoint the run left and how to resume.

Several processes (``torchrun --nproc_per_node N -m apart_fast train ...``): see ``step/distributed.py``.
Rank 0 alone writes files and prints; every rank evaluates a slice of the held-out/test data; a
stop signal and the fault flags are agreed between ranks at log intervals, so all ranks stop after
the same step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apart_fast.attacks import evaluate
from apart_fast.config import RESUME_MAY_CHANGE, Config, ConfigError
from apart_fast.data import DeviceLoader, ImageData, decode_uint8, load_dataset, random_subset
from apart_fast.diagnostics import epoch_probe
from apart_fast.engine import checkpoint
from apart_fast.engine.ema import WeightAverage
from apart_fast.engine.faults import (
    FaultMonitor,
    NumericFaultError,
    RunFailedError,
    StopSignals,
    TrainingInterrupted,
    is_out_of_memory,
)
from apart_fast.engine.graphs import GraphStep
from apart_fast.engine.run_folder import (
    BACKUP,
    RUN_FILES,
    START,
    FolderLock,
    backup_pending,
    discard_start,
    drop_backup,
    foreign_files,
    leftovers,
    recover,
    restore_backup,
    run_files,
)
from apart_fast.methods import DataInfo, Method, build_method
from apart_fast.models import attach_sites, build_model
from apart_fast.step.amp import Precision
from apart_fast.step.distributed import LOCAL, Comm, ShardLoader
from apart_fast.step.guard import BufferGuard, finite_flag
from apart_fast.step.optim import DeviceSGD, FusedSGD
from apart_fast.step.schedule import CyclicSchedule, DeviceSchedule

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
AUTO_OUT = "auto"  # Config.out (the CLI's default): a fresh folder named by auto_out_dir


def auto_device(name: str) -> str:
    """``auto`` as ``cuda`` when a CUDA device is available, else ``cpu``; any other name unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_device(name: str) -> torch.device:
    """``name`` (``auto`` included) as a torch.device, refusing CUDA when none is available; ``cuda:N`` also
    becomes the current CUDA device, since graph capture, the current stream and Triton launches all use it."""
    name = auto_device(name)
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: apart_fast trains and evaluates on cpu or cuda devices only; pass --device "
                          "auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None:
        n = torch.cuda.device_count()
        if dev.index >= n:
            raise ConfigError(f"--device {name}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
        torch.cuda.set_device(dev)
    return dev


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


def check_backend(backend: str, device: torch.device) -> None:
    """ConfigError unless the perturbation-op backend ``backend`` loads and launches on ``device``: one tiny kernel
    (``pack_sign``) runs and is checked, so a backend that loads but cannot launch there (Triton on a CPU without
    its interpreter) fails before anything is written, not mid-run."""
    from apart_fast import ops

    try:
        signs = ops.pack_sign(torch.tensor([-2.0, 0.0, 3.0], device=device), backend=backend).cpu()
        if not torch.equal(signs, torch.tensor([-1, 0, 1], dtype=torch.int8)):
            raise RuntimeError(f"its sign kernel returned {signs.tolist()} for the signs of [-2, 0, 3]")
    except Exception as err:  # the launch's own error: "0 active drivers", a missing GPU architecture, ...
        if is_out_of_memory(err):
            raise
        why = " ".join(str(err).split())[:300]
        if backend == "triton" and device.type == "cpu":
            why += " (Triton runs CPU tensors only with TRITON_INTERPRET=1 set before the process starts)"
        raise ConfigError(f"--backend {backend} cannot run on {device}: {why}; pass --backend auto or torch") from None


def check_model_fits(model: nn.Module, d: ImageData, device: torch.device, channels_last: bool = False) -> None:
    """ConfigError unless ``model`` maps two of the data's images to logits over its classes: one eval-mode forward
    (no statistics updated, no gradients), so a model built for other images or classes fails before the run starts."""
    x = decode_uint8(d.train_x[:2].to(device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n, k = int(x.shape[0]), d.num_classes
    images = f"{d.channels}-channel {d.image_size[0]}x{d.image_size[1]} images"
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except Exception as err:
        if is_out_of_memory(err):
            raise
        raise ConfigError(f"the model does not take this data's {images}: its forward on a batch of shape "
                          f"{tuple(x.shape)} (N,C,H,W) failed ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                          f"build it for {images}") from None
    finally:
        model.train(training)
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if shape != (n, k) or not logits.is_floating_point():
        raise ConfigError(f"the model returns {shape} for a batch of {n} images but the data has {k} classes; make it "
                          f"return float logits of shape (N, {k})")
    top = max(int(y.max()) for y in (d.train_y, d.test_y) if y.numel())
    if top >= k:
        raise ConfigError(f"the data's labels go up to {top} but it names {k} classes; pass labels in [0, {k - 1}]")


def data_fingerprint(d: ImageData) -> dict[str, Any]:
    """What a checkpoint records of its training data: sizes, image shape, classes and a sha256 of every
    image and label, so a resume on data that changed (or an evaluation at another image size) is refused."""
    digest = hashlib.sha256()
    for t in (d.train_x, d.train_y, d.test_x, d.test_y):
        digest.update(t.contiguous().numpy().data)
    return {"n_train": int(d.train_x.shape[0]), "n_test": int(d.test_x.shape[0]), "shape": list(d.train_x.shape[1:]),
            "classes": d.num_classes, "sha256": digest.hexdigest()}


def _data_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """How the data a checkpoint was trained on differs from ``now`` (``data_fingerprint``s), in words."""
    names = {"n_train": "training examples", "n_test": "test examples", "shape": "image shape (C,H,W)", "classes": "classes"}
    parts = [f"{names[k]} {saved.get(k)} -> {now[k]}" for k in names if saved.get(k) != now[k]]
    return "; ".join(parts) or "same sizes, different images or labels"


def resume_config(saved: Config, cfg: Config, changed: Collection[str] | None, out: str) -> Config:
    """The resumed run's config: the checkpoint's own, with the ``RESUME_MAY_CHANGE`` fields of ``cfg``
    that were set (``changed``; None: those differing from Config()'s defaults), refusing any other change."""
    def flat(c: Config) -> dict[str, Any]:
        d = c.to_dict()
        return {**{k: v for k, v in d.items() if k != "apart"}, **{f"apart_{k}": v for k, v in d["apart"].items()}}

    old, new = flat(saved), flat(cfg)
    if changed is None:
        default = flat(Config())
        changed = {k for k in new if new[k] != default[k]}
    allowed = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
    merged = Config.from_dict(saved.to_dict())
    for name in sorted(set(changed) & set(new) - {"out"}):
        flag = "--" + name.replace("_", "-")
        if name == "epochs" and new[name] < old[name]:
            raise ConfigError(f"--epochs {new[name]} is fewer than the {old[name]} of the run in {out}; a resumed run's "
                              "--epochs may only grow: drop --epochs or pass a larger value")
        if name in RESUME_MAY_CHANGE:
            setattr(merged, name, new[name])
        elif new[name] != old[name]:
            raise ConfigError(f"{flag} {new[name]} differs from the run in {out} ({old[name]}); a resumed run keeps its "
                              f"settings except {allowed} (--epochs may only grow): drop {flag} or start a new --out")
    merged.out = out
    return merged.validate()


def _device_name(dev: torch.device) -> str:
    """What the run trained on, in words (for the log and results.json)."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"


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
        unset = [k for k in ("model", "width", "epochs") if getattr(cfg, k) is None and (model is None or k == "epochs")]
        cfg = cfg.validate().resolved()  # model, width, epochs: the dataset's unless set (imagefolder's below, by size)
        self.cfg = cfg
        self.comm = comm if comm is not None else LOCAL
        self.device = resolve_device(device if device is not None else cfg.device)
        check_backend(cfg.backend, self.device)
        torch.manual_seed(cfg.seed)
        self.data_from_config = data is None  # False: the caller's data, which eval cannot reload from the config
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        d = self.data
        cfg = self.cfg = cfg.resolved(d.image_size)
        self.defaulted = [k for k in unset if getattr(cfg, k) is not None]  # for the first log line
        self.data_info = data_fingerprint(d)
        pick = random_subset(int(d.train_x.shape[0]), cfg.train_subset, cfg.seed)
        if pick is not None:
            d = dataclasses.replace(d, train_x=d.train_x[pick], train_y=d.train_y[pick])
        # Validation slice for model_best.pt: training-split images held out of training, so the test
        # split that scores the best checkpoint played no part in choosing it (Rice et al. 2020).
        n_all = int(d.train_x.shape[0])
        perm = torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed + 3))
        n_val = min(cfg.eval_n, n_all // 10)
        val, keep = perm[:n_val].sort().values, perm[n_val:].sort().values
        self.val_x, self.val_y = d.train_x[val], d.train_y[val]
        self.train_x, self.train_y = d.train_x[keep], d.train_y[keep]
        d = self.data = dataclasses.replace(d, train_x=self.train_x, train_y=self.train_y)  # what is trained on
        n_train = int(keep.shape[0])
        if cfg.batch_size > n_train:
            held = f" ({n_all} less a {n_val}-image validation slice)" if n_val else ""
            raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training examples{held}; "
                              "pass a smaller batch size")
        pad = d.pad if cfg.pad is None else cfg.pad
        flip = d.flip if cfg.flip is None else cfg.flip
        mean, std = (CIFAR_MEAN, CIFAR_STD) if cfg.normalize and d.channels == 3 else (None, None)
        if model is None:
            model = build_model(cfg.model, num_classes=d.num_classes, in_channels=d.channels, width=cfg.width,
                                mean=mean, std=std, shortcut=cfg.shortcut, image_size=d.image_size[0], stem=cfg.stem)
        self.user_model = not hasattr(model, "config")
        cuda = self.device.type == "cuda"
        if cfg.sync_bn and self.comm.distributed and cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algorithms once
        # fp32 means fp32, process-wide like cudnn.benchmark: --amp none's convolutions and matmuls and the fp32 stem
        # under autocast (models.sites.full_precision) would otherwise run in TF32 on Ampere and later (cuDNN's
        # default), whose spacing (~5e-4 near 1) swallows small step sizes such as the APART script's 1e-4 start.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        channels_last = bool(cfg.channels_last if cfg.channels_last is not None else cuda)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        check_model_fits(self.model, d, self.device, channels_last)
        if cfg.method == "apart" and cfg.apart.layer_perturb:  # the model's own sites, else hooks (before anything is written)
            try:
                attach_sites(self.model, cfg.apart.sites)
            except ValueError as e:
                raise ConfigError(f"{e} (Python: ApartConfig(layer_perturb=False))") from None
        self.comm.broadcast_([*self.model.parameters(), *self.model.buffers()])  # the same start on every rank
        lkw = dict(device=self.device, pad=pad, pad_mode=cfg.pad_mode, pad_value=cfg.pad_value, flip=flip, seed=cfg.seed,
                   channels_last=channels_last)
        if cfg.keep_last_batch:  # the APART script's loader: the last partial batch is a step too
            if self.comm.distributed:
                raise ConfigError("--keep-last-batch needs one process (ranks train on equal slices); drop it under torchrun")
            self.loader: DeviceLoader = DeviceLoader(self.train_x, self.train_y, cfg.batch_size, ragged="keep", **lkw)
        else:
            self.loader = ShardLoader(self.train_x, self.train_y, cfg.batch_size, ragged="drop", rank=self.comm.rank,
                                      world=self.comm.world, **lkw)
        h, w = d.image_size
        info = DataInfo(n_train=n_train, channels=d.channels, height=h, width=w, pad=pad, channels_last=channels_last)
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
            if cfg.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
                raise ConfigError(f"--compile-backend {cfg.compile_backend!r} is not a torch.compile backend; use inductor, "
                                  "aot_eager or another name from torch.compiler.list_backends(exclude_tags=())")
            # the engine keeps the plain module for checkpoints
            self.method.model = torch.compile(self.model, backend=cfg.compile_backend)
        store = getattr(self.method, "store", None)
        self.comm.broadcast_([*getattr(self.method, "step_sizes", list)(), *([store] if store is not None else [])])
        self.epochs = math.ceil(cfg.epochs / self.method.data_passes_divisor)
        steps = self.epochs * len(self.loader)
        params = list(self.model.parameters()) + self.method.extra_model_params()
        # step/optim.py: PyTorch's fused SGD eagerly; flat state for the captured step, where the step sizes
        # under legacy_model_decay stay the generator's (``shared``), copied in and out around each update.
        opt_cls, sched_cls = (DeviceSGD, DeviceSchedule) if self.graphs else (FusedSGD, CyclicSchedule)
        shared = {"shared": self.method.extra_model_params()} if self.graphs else {}
        self.optimizer = opt_cls(params, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **shared)
        replays = self.method.data_passes_divisor
        self.schedule = sched_cls(self.optimizer, steps * replays, cfg.lr, (cfg.momentum, cfg.momentum_low))
        self.method.attach(self.optimizer, self.schedule, steps)
        # --ema: the average of the model after every step (ema.py), captured with the step where it is
        self.ema = WeightAverage(self.model, cfg.ema, cfg.ema_warmup) if cfg.ema is not None else None
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # completed steps of the epoch in progress (0 at a boundary)
        self.step_count = 0  # completed steps of the run
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0  # process CPU time of the training steps (other jobs on the machine do not add to it)
        self.best_robust, self.best_epoch = -1.0, 0  # validation robust accuracy of model_best.pt
        self.buffers = BufferGuard(self.model, sync_free=True if self.graphs else None)  # graphs: CUDA's branch everywhere
        self.stepper = GraphStep(self.step, capture=self.graphs and cuda, generators=[self.method.generator]) \
            if self.graphs else None
        self.faults = FaultMonitor(self.device, min(cfg.log_interval, len(self.loader)))
        self.faults_before = 0  # faults of earlier starts of this run: --max-faults counts this start's only
        self.saved_at: tuple[int, int, int] | None = None  # (epoch, step in epoch, step) of this run's checkpoint.pt
        self.out: Path | None = None  # where fault events are logged (set by ``train``)
        self.replacing = False  # an --overwrite keeps the run it replaces until this run has finished an epoch
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
        if self.ema is not None:
            self.comm.average_buffers(self.ema.module)
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
            "train_cpu_seconds": self.train_cpu_seconds,
            "best": [self.best_robust, self.best_epoch],
            "precision": self.precision.state_dict(),
            "world": self.comm.world,
            "rank_states": rank_states,
            "data": self.data_info,
            "data_from_config": self.data_from_config,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a full checkpoint (``state_dict``); refuses one of another model or a model.pt."""
        if state.get("kind") != "full":
            raise checkpoint.CheckpointError("resume needs checkpoint.pt (a full checkpoint), not model.pt")
        saved_cfg, cfg = state["model_config"], self.model_config
        if saved_cfg is not None and cfg is not None and "shortcut" in cfg.get("kwargs", {}):
            saved_cfg = {**saved_cfg, "kwargs": {"shortcut": "act", **saved_cfg["kwargs"]}}  # written before --shortcut
        if (saved_cfg is None) != (cfg is None):
            raise checkpoint.CheckpointError(
                "checkpoint holds a user-defined model, pass the same model to train()" if saved_cfg is None
                else "checkpoint holds a built-in model; resume it without passing model= (or with a model of that config)")
        if saved_cfg != cfg:
            raise checkpoint.CheckpointError(
                f"checkpoint holds model {saved_cfg['name']} {saved_cfg['kwargs']}, "
                f"this run builds {cfg['name']} {cfg['kwargs']}; pass the same --model/--width"
            )
        data = state.get("data")
        if data is not None and data != self.data_info:
            raise checkpoint.CheckpointError(
                f"the data differs from the data the checkpoint was trained on ({_data_change(data, self.data_info)}); "
                f"resume with that data ({self.cfg.dataset} {self.cfg.data_dir or ''}) or start a new --out")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.method.load_state_dict(state["method"])
            self.loader.load_state_dict(state["loader"])
        except (RuntimeError, KeyError, ValueError, IndexError) as err:  # a checkpoint without "data": other data or code
            raise checkpoint.CheckpointError(
                f"the checkpoint does not fit this run ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                "resume with the data and apart_fast version that wrote it, or start a new --out") from None
        torch.set_rng_state(state["rng_cpu"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.step_count = int(state.get("step_count", self.epoch * len(self.loader)))
        self._sums = {k: v.to(self.device) for k, v in state.get("epoch_sums", {}).items()}
        self._epoch_loader = state["loader"] if self.step_in_epoch else None
        if "faults" in state:
            self.faults.load_state_dict(state["faults"])
        self.faults_before = self.faults.total
        self.saved_at = (self.epoch, self.step_in_epoch, self.step_count)
        self.train_seconds = float(state["train_seconds"])
        self.train_cpu_seconds = float(state.get("train_cpu_seconds", 0.0))  # absent from checkpoints before it
        self.best_robust, self.best_epoch = float(state["best"][0]), int(state["best"][1])
        if "precision" in state:
            self.precision.load_state_dict(state["precision"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise checkpoint.CheckpointError("checkpoint was written without --ema but its config asks for it; "
                                                 "resume it with the apart_fast version that wrote it")
            self.ema.load_state_dict(state["ema"])
        # Per-rank state (random-start generators, Free's perturbation): this rank's, when the
        # checkpoint was written by at least rank+1 processes; else the fresh per-rank seed stays.
        ranks = state.get("rank_states") or []
        if self.comm.world > 1 or len(ranks) > 1:
            self.method.load_rank_state(ranks[self.comm.rank] if self.comm.rank < len(ranks) else None)

    def describe(self, out: Path | None) -> str:
        """Model, width and epochs (naming those that are the dataset's defaults) and the output folder, for the log."""
        kw = self.model_config["kwargs"] if self.model_config is not None else {}
        name = self.cfg.model if self.model_config is not None else f"your {type(self.model).__name__}"
        text = f"{name} width {kw['width']}" if "width" in kw else f"{name} widen {kw['widen']}" if "widen" in kw else name
        text += f", {self.cfg.epochs} epoch{'s' if self.cfg.epochs != 1 else ''}"
        if self.defaulted:
            text += f" ({'/'.join('--' + k for k in self.defaulted)}: {self.cfg.dataset}'s defaults)"
        return text + (f"; writing to {out}" if out is not None else "; no output folder (--out none): nothing will be saved")

    def model_payload(self, ema: bool = False) -> dict[str, Any]:
        """What ``load_model`` needs: the model's constructor config and weights (``ema``: the averaged ones), plus provenance."""
        model = self.ema.module if ema and self.ema is not None else self.model
        return {
            "kind": "model",
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_config": self.model_config,
            "model": model.state_dict(),
            "method": self.cfg.method,
            "epoch": self.epoch,
            "data": self.data_info,
            "data_from_config": self.data_from_config,
            "averaged": ema,
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
    """Drop the metrics.jsonl lines past the checkpoint (a kill -9 can leave some) and those that are no record of a
    run (cut short by a kill, blank, ``null``, not JSON); return the kept epoch records."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    kept, history = [], []
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # cut short by a kill, or not JSON (or not UTF-8) at all
            continue
        if not isinstance(rec, dict):
            continue
        step, epoch = rec.get("step"), rec.get("epoch")
        if not isinstance(epoch, int) or ("step" in rec and not isinstance(step, int)):  # runs before "step": no key
            continue
        if step > run.step_count if step is not None else epoch > run.epoch:
            continue
        kept.append(line)
        if "event" not in rec:
            history.append(rec)
    checkpoint.atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    return history


def _interrupted(run: Run, out: Path | None, stop: StopSignals, saved: bool) -> TrainingInterrupted:
    """The exception that ends an interrupted run, its message saying where the run stands and how to resume."""
    name = {130: "SIGINT", 143: "SIGTERM"}.get(stop.exit_code, f"signal {stop.signum}")
    where = (f"epoch {run.epoch + 1}, step {run.step_in_epoch}/{len(run.loader)}" if run.step_in_epoch
             else f"the end of epoch {run.epoch}")
    if out is None:
        return TrainingInterrupted(f"interrupted by {name} at {where}; the run had --out none, so nothing was saved",
                                   stop.exit_code)
    if run.replacing:  # _train puts the run --overwrite was replacing back and says so
        return TrainingInterrupted(f"interrupted by {name} at {where}, before the new run finished its first epoch, "
                                   "so it was not kept", stop.exit_code)
    if not saved and not (out / "checkpoint.pt").exists():
        return TrainingInterrupted(f"interrupted by {name} before the first checkpoint; nothing to resume, "
                                   f"start again with --overwrite --out {out}", stop.exit_code)
    what = f"checkpoint.pt saved at {where}" if saved else "checkpoint.pt holds the last complete checkpoint"
    return TrainingInterrupted(f"interrupted by {name}; {what}; resume with: apart-fast train --resume {out}",
                               stop.exit_code)


def _position(run: Run) -> str:
    """Where the run stands, in words: 'step S (epoch E, step i of n)' or 'step S (the end of epoch E)'."""
    if run.step_in_epoch:
        return f"step {run.step_count} (epoch {run.epoch + 1}, step {run.step_in_epoch} of {len(run.loader)})"
    return f"step {run.step_count} (the end of epoch {run.epoch})" if run.epoch else f"step {run.step_count} (the start)"


def _held(run: Run, out: Path) -> str:
    """What ``out``/checkpoint.pt holds for a message: the position it was saved at, or that there is none."""
    if run.saved_at is None:
        return f"no checkpoint was written to {out}"
    epoch, step_in_epoch, step = run.saved_at
    where = f"epoch {epoch + 1}, step {step_in_epoch} of {len(run.loader)}" if step_in_epoch else f"the end of epoch {epoch}"
    return f"{out}/checkpoint.pt holds the finite state after step {step} ({where})"


def model_finite(run: Run) -> bool:
    """Whether every weight and buffer (BatchNorm statistics included) of the model is finite (one sync)."""
    tensors = [t for t in run.model.state_dict().values() if t.is_floating_point()]
    return bool(finite_flag(torch.zeros((), device=run.device), tensors))


def _save_checkpoint(run: Run, out: Path, model_too: bool = False, best: bool = False) -> None:
    """checkpoint.pt (and model.pt / model_best.pt), built on every rank, written by rank 0, after checking
    the model is finite (a non-finite model is never saved over the last good checkpoint)."""
    if not model_finite(run):
        raise NumericFaultError(f"the model holds non-finite weights or BatchNorm statistics after {_position(run)}, "
                                "so it was not saved")
    state = run.state_dict()
    if run.comm.is_main:
        if best:
            checkpoint.save(out / "model_best.pt", run.model_payload())
        checkpoint.save(out / "checkpoint.pt", state)
        (out / START).unlink(missing_ok=True)  # the folder holds a run now
        if run.replacing:  # only at the end of an epoch: the new run finished one, the run it replaces goes
            drop_backup(out)
    run.replacing = False
    run.saved_at = (run.epoch, run.step_in_epoch, run.step_count)
    if not run.comm.is_main:
        return
    if model_too:
        checkpoint.save(out / "model.pt", run.model_payload())
        if run.ema is not None:
            checkpoint.save(out / "model_ema.pt", run.model_payload(ema=True))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state dict (what a checkpoint of it takes on disk, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data: ImageData | None = None, model: nn.Module | None = None,
          changed: Collection[str] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return the final results; with ``cfg.out`` set, write metrics and checkpoints there.

    ``resume`` continues the run in ``cfg.out`` from its checkpoint.pt with the checkpoint's own config;
    of ``cfg``'s fields, those in ``changed`` (None: those that differ from Config()'s defaults) may
    differ from it only if listed in ``config.RESUME_MAY_CHANGE`` (``epochs`` only upwards).
    ``model``: a user's model instead of ``cfg.model`` (see ``Run``; pass it again to resume).
    Under torchrun (``WORLD_SIZE`` > 1) the processes train one model data-parallel
    (``step/distributed.py``) and rank 0 writes; a checkpoint resumes on any number of processes.
    Raises ConfigError/DataError/CheckpointError on bad input, found before anything is written;
    then ``TrainingInterrupted`` after SIGINT/SIGTERM (checkpoint written), ``NumericFaultError``
    after ``cfg.max_faults`` non-finite steps, ``RunFailedError`` on an OSError or out of memory,
    each naming the checkpoint left.
    """
    cfg.validate()
    if cfg.data_dir is not None:  # kept absolute, so an eval or resume from another folder reads the same data
        cfg = dataclasses.replace(cfg, data_dir=str(Path(cfg.data_dir).expanduser().absolute()))
    comm, device = Comm.from_env(auto_device(cfg.device))
    try:
        return _train(cfg, comm, device, resume, overwrite, progress, data, model, changed)
    finally:
        comm.close()


def _train(cfg: Config, comm: Comm, device: str, resume: bool, overwrite: bool, progress: bool,
           data: ImageData | None, model: nn.Module | None, changed: Collection[str] | None) -> dict[str, Any]:
    """``train`` inside its process group: the validation phase, then the run, with the output folder locked by rank 0
    from the first look at it (a folder that does not exist yet: from its creation) to the end."""
    progress = progress and comm.is_main
    if cfg.out == AUTO_OUT:
        if resume:
            raise ConfigError("--resume needs the run's folder; pass --resume DIR")
        cfg = dataclasses.replace(cfg, out=comm.broadcast_object(auto_out_dir(cfg) if comm.is_main else None))
    lock = FolderLock(Path(cfg.out), "--resume" if resume else "--out") if cfg.out is not None and comm.is_main else None
    made = _missing_folders(lock.folder) if lock is not None else []
    try:
        if lock is not None and lock.folder.is_dir():
            lock.acquire()
            recover(lock.folder)
        comm.barrier()  # rank 0 holds the folder and settled it before any rank judges it
        if resume:
            restart = _restart_config(cfg, changed, comm)
            if restart is not None:
                cfg, resume = restart, False
        out = check_out_dir(cfg.out, resume, overwrite)
        saved = None
        if resume:
            assert out is not None
            saved = _load_resume(out)
            cfg = resume_config(Config.from_dict(saved["config"]), cfg, changed, str(out))
        run = Run(cfg, data, model=model, comm=comm, device=device)
        if saved is not None:
            run.load_state_dict(saved)
        if out is not None:
            state = run.state_dict()
            model_bytes = _tensor_bytes(state["model"])
            check_free_space(out, 2 * _tensor_bytes(state) + 2 * model_bytes)
            del state
        comm.barrier()  # every rank has checked everything before rank 0 writes
        try:
            return _run(run, out, resume, overwrite, progress, lock)
        except BaseException as err:
            if out is not None and not resume and lock is not None and lock.held:  # never in a folder another process holds
                if restore_backup(out):
                    err.args = (f"{err.args[0] if err.args else err}; the run --overwrite would have replaced is back "
                                f"in {out}", *err.args[1:])
                else:
                    discard_start(out)
            raise
    finally:
        if lock is not None and lock.held:
            lock.release()
            for folder in made:  # a start that failed before its first checkpoint leaves no folder behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what creating ``path`` would make)."""
    made = []
    probe = path.absolute()
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    return made


def _restart_config(cfg: Config, changed: Collection[str] | None, comm: Comm) -> Config | None:
    """``--resume`` of a folder whose start stopped before its first checkpoint (killed in its first epoch): the config
    to start that run over with, its ``config.json``'s (``resume_config`` applies the flags given); None otherwise."""
    out = Path(cfg.out or "")
    if not leftovers(out) or not (out / "config.json").is_file():
        return None
    try:
        saved = Config.from_dict(json.loads((out / "config.json").read_text())).validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--resume {out}: its start stopped before the first checkpoint and its config.json cannot be "
                          f"read ({err}); train into it again without --resume") from None
    if comm.is_main:
        _warn(f"{out} holds no checkpoint yet (its start stopped before the first one): starting that run over with "
              "the settings of its config.json")
    return resume_config(saved, cfg, changed, str(out))


def _run(run: Run, out: Path | None, resume: bool, overwrite: bool, progress: bool,
         lock: FolderLock | None) -> dict[str, Any]:
    """The run after the validation phase: prepare the output folder, train, evaluate, write the results."""
    cfg, comm = run.cfg, run.comm
    history: list[dict[str, Any]] = []
    if out is not None:  # everything is checked: from here on the run may write
        run.out = out
        if comm.is_main:
            run.replacing = prepare_out_dir(str(out), resume, overwrite, lock)
            if resume:
                history = _trim_metrics(out, run)
            checkpoint.atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        run.replacing = comm.broadcast_object(run.replacing)
        history = comm.broadcast_object(history)
    hx, hy = run.val_x, run.val_y
    if progress:
        amp = run.precision.mode
        tqdm.write(f"apart-fast: {cfg.method} on {run.device} ({_device_name(run.device)}), amp {amp}, "
                   f"{len(run.loader)} steps/epoch, validation {int(hx.shape[0])} training-split images; "
                   f"{run.describe(out)}", file=sys.stderr)
        for line in run.method.describe():
            tqdm.write(f"apart-fast: {line}", file=sys.stderr)
    stop = StopSignals()
    with stop.installed():
        try:
            results = _train_loop(run, out, history, hx, hy, progress, stop)
            ev = results.pop("_final")
            results.update(test_clean_acc=ev["clean_acc"], test_robust_acc=ev["robust_acc"], test_n=ev["n"],
                           eval=f"PGD-{cfg.final_eval_steps}x{cfg.final_eval_restarts}, eps {cfg.eval_eps:.4g}")
            ema = results.pop("_final_ema", None)
            if ema is not None:
                results.update(ema_test_clean_acc=ema["clean_acc"], ema_test_robust_acc=ema["robust_acc"],
                               ema_decay=cfg.ema, ema_warmup=cfg.ema_warmup)
            results["out"] = str(out) if out is not None else None
            if out is not None and comm.is_main:
                checkpoint.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
        except KeyboardInterrupt:  # a second signal, or one during the final evaluation
            if stop.signum is None:
                raise
            raise _interrupted(run, out, stop, saved=False) from None
        except NumericFaultError as err:
            if out is None:
                raise
            if run.saved_at is None and not run.replacing and model_finite(run):  # nothing saved yet: keep this state
                _save_checkpoint(run, out)
            evaluate_it = (f"; evaluate it with: apart-fast eval --checkpoint {out}/checkpoint.pt, or resume with a "
                           f"lower peak lr: apart-fast train --resume {out} --lr <lower>") if run.saved_at else ""
            raise NumericFaultError(f"{err}; {_held(run, out)}{evaluate_it}") from None
        except (OSError, MemoryError, RuntimeError) as err:
            if not isinstance(err, OSError) and not is_out_of_memory(err):
                raise
            what = f"{type(err).__name__}: {' '.join(str(err).split())}"
            resume_it = f"; fix the cause and resume with: apart-fast train --resume {out}" if run.saved_at else ""
            kept = _held(run, out) if out is not None else "the run had --out none, so nothing was saved"
            raise RunFailedError(f"the run failed at {_position(run)} ({what}); {kept}{resume_it}") from err
    run.model.zero_grad(set_to_none=True)  # the caller's next backward must not add to the last step's gradients
    results["model"] = run.model
    if run.ema is not None:
        results["model_ema"] = run.ema.module
    return results


def _train_loop(run: Run, out: Path | None, history: list[dict[str, Any]], hx: torch.Tensor, hy: torch.Tensor,
                progress: bool, stop: StopSignals) -> dict[str, Any]:
    """The epochs and the final evaluation; raises TrainingInterrupted once a signal was seen."""
    cfg = run.cfg
    while run.epoch < run.epochs:
        stats = run.train_epoch(progress, stop)
        if stats is None:  # a signal mid-epoch: save the step we stopped after (an --overwrite's first epoch: drop it)
            saved = out is not None and not run.replacing
            if saved:
                _save_checkpoint(run, out)
            raise _interrupted(run, out, stop, saved=saved)
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
    n_val = int(hx.shape[0])
    selection = (f"model_best.pt: highest PGD-{cfg.eval_steps} accuracy on {n_val} training-split images held out of "
                 "training (validation slice, disjoint from the test split)" if n_val and cfg.eval_steps else
                 "none (no validation slice: --eval-n 0 or no PGD steps)")
    results: dict[str, Any] = {"method": cfg.method, "epochs": run.epochs, "train_seconds": run.train_seconds,
                               "train_cpu_seconds": run.train_cpu_seconds,
                               "best_epoch": run.best_epoch, "best_holdout_robust_acc": run.best_robust,
                               "selection": selection, "n_train": len(run.train_y), "n_validation": n_val,
                               "passes_per_step": run.method.passes, "steps_per_epoch": len(run.loader),
                               "skipped_steps": run.faults.total, "device": str(run.device),
                               "device_name": _device_name(run.device), "amp": run.precision.mode, "history": history}
    if hasattr(run.method, "resolved"):
        results["apart"] = run.method.resolved()
    d = run.data
    results["_final"] = run.evaluate(d.test_x, d.test_y, steps=cfg.final_eval_steps, restarts=cfg.final_eval_restarts,
                                     progress=progress)
    if run.ema is not None:
        results["_final_ema"] = run.evaluate(d.test_x, d.test_y, steps=cfg.final_eval_steps,
                                             restarts=cfg.final_eval_restarts, progress=progress, model=run.ema.module)
    return results
