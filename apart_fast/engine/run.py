"""Assembling a run: the config resolved against the data, the validation slice held out of training, the model
(built or the user's, checked against two images, sites attached), the loader, the method, precision, CUDA graphs,
optimizers and schedules, the fault guard and the weight average. Everything is checked before anything is written.
Its checkpoint state is in ``state.py``, its epochs in ``epoch.py``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apart_fast.config import Config, ConfigError
from apart_fast.data import DeviceLoader, ImageData, decode_uint8, load_dataset, random_subset
from apart_fast.engine.device import check_backend, resolve_device
from apart_fast.engine.ema import WeightAverage
from apart_fast.engine.epoch import RunEpochs
from apart_fast.engine.faults import FaultMonitor, is_out_of_memory
from apart_fast.engine.graphs import GraphStep
from apart_fast.engine.resume import data_fingerprint
from apart_fast.engine.state import RunState
from apart_fast.methods import DataInfo, Method, build_method
from apart_fast.models import attach_sites, build_model
from apart_fast.step.amp import Precision
from apart_fast.step.distributed import LOCAL, Comm, ShardLoader
from apart_fast.step.guard import BufferGuard
from apart_fast.step.optim import DeviceSGD, FusedSGD
from apart_fast.step.schedule import CyclicSchedule, DeviceSchedule

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


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


class Run(RunState, RunEpochs):
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
                raise ConfigError(str(e)) from None
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

    def describe(self, out: Path | None) -> str:
        """Model, width and epochs (naming those that are the dataset's defaults) and the output folder, for the log."""
        kw = self.model_config["kwargs"] if self.model_config is not None else {}
        name = self.cfg.model if self.model_config is not None else f"your {type(self.model).__name__}"
        text = f"{name} width {kw['width']}" if "width" in kw else f"{name} widen {kw['widen']}" if "widen" in kw else name
        text += f", {self.cfg.epochs} epoch{'s' if self.cfg.epochs != 1 else ''}"
        if self.defaulted:
            text += f" ({'/'.join('--' + k for k in self.defaulted)}: {self.cfg.dataset}'s defaults)"
        return text + (f"; writing to {out}" if out is not None else "; no output folder (--out none): nothing will be saved")
