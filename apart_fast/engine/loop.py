"""The training loop: data on the device, one method step per batch, metrics read only at log intervals,
a held-out evaluation and a full checkpoint after every epoch, exact resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from apart_fast.attacks import evaluate
from apart_fast.config import Config, ConfigError
from apart_fast.data import DeviceLoader, ImageData, load_dataset
from apart_fast.diagnostics import epoch_probe
from apart_fast.engine import checkpoint
from apart_fast.engine.schedule import CyclicSchedule
from apart_fast.methods import DataInfo, Method, build_method
from apart_fast.models import build_model

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


def prepare_out_dir(out: str | None, resume: bool, overwrite: bool) -> Path | None:
    """Refuse an output folder that holds another run unless resuming or overwriting."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    taken = [f for f in RUN_FILES if (path / f).exists()]
    if taken and not resume and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({taken[0]}); pass --resume {out}, --overwrite, or another --out")
    if overwrite and not resume:
        for f in taken:
            (path / f).unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


class Run:
    """Everything one training run holds: data, model, method, optimizers, progress."""

    def __init__(self, cfg: Config, data: ImageData | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        d = self.data
        n_train = int(d.train_x.shape[0])
        if cfg.batch_size > n_train:
            raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training examples; pass a smaller batch size")
        pad = d.pad if cfg.pad is None else cfg.pad
        flip = d.flip if cfg.flip is None else cfg.flip
        mean, std = (CIFAR_MEAN, CIFAR_STD) if cfg.normalize and d.channels == 3 else (None, None)
        self.model = build_model(
            cfg.model, num_classes=d.num_classes, in_channels=d.channels, width=cfg.width, mean=mean, std=std
        ).to(self.device)
        self.loader = DeviceLoader(
            d.train_x, d.train_y, cfg.batch_size, device=self.device, pad=pad, pad_mode=cfg.pad_mode,
            pad_value=cfg.pad_value, flip=flip, ragged="drop", seed=cfg.seed,
        )
        h, w = d.image_size
        info = DataInfo(n_train=n_train, channels=d.channels, height=h, width=w, pad=pad)
        self.method: Method = build_method(cfg.method, self.model, cfg, info, self.device)
        self.epochs = math.ceil(cfg.epochs / self.method.data_passes_divisor)
        steps = self.epochs * len(self.loader)
        params = list(self.model.parameters()) + self.method.extra_model_params()
        self.optimizer = torch.optim.SGD(params, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        replays = self.method.data_passes_divisor
        self.schedule = CyclicSchedule(self.optimizer, steps * replays, cfg.lr, (cfg.momentum, cfg.momentum_low))
        self.method.attach(self.optimizer, self.schedule, steps)
        g = torch.Generator().manual_seed(cfg.seed + 3)
        n_test = int(d.test_x.shape[0])
        self.holdout = torch.randperm(n_test, generator=g)[: min(cfg.eval_n, n_test)]
        self.epoch = 0
        self.train_seconds = 0.0
        self.best_robust, self.best_epoch = -1.0, 0  # held-out robust accuracy of model_best.pt

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "full",
            "config": self.cfg.to_dict(),
            "model_config": self.model.config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "method": self.method.state_dict(),
            "loader": self.loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "epoch": self.epoch,
            "train_seconds": self.train_seconds,
            "best": [self.best_robust, self.best_epoch],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "full":
            raise checkpoint.CheckpointError("resume needs checkpoint.pt (a full checkpoint), not model.pt")
        if state["model_config"] != self.model.config:
            raise checkpoint.CheckpointError(
                f"checkpoint holds model {state['model_config']['name']} {state['model_config']['kwargs']}, "
                f"this run builds {self.model.config['name']} {self.model.config['kwargs']}; pass the same --model/--width"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.method.load_state_dict(state["method"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng_cpu"])
        self.epoch = int(state["epoch"])
        self.train_seconds = float(state["train_seconds"])
        self.best_robust, self.best_epoch = float(state["best"][0]), int(state["best"][1])

    def model_payload(self) -> dict[str, Any]:
        """What ``load_model`` needs: the model's constructor config and weights, plus provenance."""
        return {
            "kind": "model",
            "config": self.cfg.to_dict(),
            "model_config": self.model.config,
            "model": self.model.state_dict(),
            "method": self.cfg.method,
            "epoch": self.epoch,
        }

    def train_epoch(self, progress: bool) -> dict[str, float]:
        """One pass over the data; running sums stay on the device and are read every log_interval steps."""
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(self.loader, desc=f"{self.cfg.method} epoch {self.epoch + 1}/{self.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for i, batch in enumerate(bar):
            m = self.method.step(batch)
            for k, v in m.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            if progress and (i + 1) % self.cfg.log_interval == 0:
                n = float(sums["n"])
                bar.set_postfix(loss=f"{float(sums['loss']) / n:.3f}", acc=f"{float(sums['correct']) / n:.3f}")
        if sync:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        n = float(sums["n"])
        return {"train_loss": float(sums["loss"]) / n, "train_acc": float(sums["correct"]) / n, "seconds": seconds}

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, steps: int, restarts: int = 1, loss: str = "ce",
                 progress: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        return evaluate(self.model, x, y, batch_size=max(cfg.batch_size, 256), eps=cfg.eval_eps, step=cfg.eval_step,
                        steps=steps, restarts=restarts, loss=loss, device=self.device, progress=progress,
                        seed=cfg.seed, backend=cfg.backend)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data: ImageData | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return the final results; with ``cfg.out`` set, write metrics and checkpoints there."""
    cfg.validate()
    out = prepare_out_dir(cfg.out, resume, overwrite)
    if resume:
        if out is None or not (out / "checkpoint.pt").exists():
            raise ConfigError(f"--resume {cfg.out}: no checkpoint.pt there to resume from; train without --resume first")
        saved = checkpoint.load(out / "checkpoint.pt")
        epochs = cfg.epochs
        cfg = Config.from_dict(saved["config"])
        cfg.epochs, cfg.out = max(epochs, cfg.epochs), str(out)
        run = Run(cfg, data)
        run.load_state_dict(saved)
    else:
        run = Run(cfg, data)
        if out is not None:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    d = run.data
    hx, hy = d.test_x[run.holdout], d.test_y[run.holdout]
    history = []
    while run.epoch < run.epochs:
        rec = {"epoch": run.epoch + 1, **run.train_epoch(progress)}
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
        rec.update(best_epoch=run.best_epoch, best_holdout_robust_acc=run.best_robust)
        history.append(rec)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if improved:
                checkpoint.save(out / "model_best.pt", run.model_payload())
            checkpoint.save(out / "checkpoint.pt", run.state_dict())
            checkpoint.save(out / "model.pt", run.model_payload())
        if progress:
            desc = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float) and not k.startswith("a_"))
            tqdm.write(f"[{cfg.method}] epoch {rec['epoch']}: {desc}")
    results: dict[str, Any] = {"method": cfg.method, "epochs": run.epochs, "train_seconds": run.train_seconds,
                               "best_epoch": run.best_epoch, "best_holdout_robust_acc": run.best_robust,
                               "passes_per_step": run.method.passes, "steps_per_epoch": len(run.loader),
                               "device": str(run.device), "history": history}
    ev = run.evaluate(d.test_x, d.test_y, steps=cfg.final_eval_steps, restarts=cfg.final_eval_restarts,
                      progress=progress)
    results.update(test_clean_acc=ev["clean_acc"], test_robust_acc=ev["robust_acc"], test_n=ev["n"],
                   eval=f"PGD-{cfg.final_eval_steps}x{cfg.final_eval_restarts}, eps {cfg.eval_eps:.4g}")
    if out is not None:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results["model"] = run.model
    return results
