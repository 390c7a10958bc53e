"""What a run saves and restores: the full state behind ``checkpoint.pt`` (exact resume, at an epoch boundary or mid-epoch),
the model files ``load_model`` reads, and the checkpoint written only for a finite model, with where it stands in words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apart_fast.engine import checkpoint
from apart_fast.engine.faults import NumericFaultError
from apart_fast.engine.resume import data_change
from apart_fast.engine.run_folder import START, drop_backup
from apart_fast.step.guard import finite_flag


class RunState:
    """The checkpoint half of ``Run`` (run.py), which sets every attribute used here."""

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
                f"the data differs from the data the checkpoint was trained on ({data_change(data, self.data_info)}); "
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

    def position(self) -> str:
        """Where the run stands, in words: 'step S (epoch E, step i of n)' or 'step S (the end of epoch E)'."""
        if self.step_in_epoch:
            return f"step {self.step_count} (epoch {self.epoch + 1}, step {self.step_in_epoch} of {len(self.loader)})"
        return f"step {self.step_count} (the end of epoch {self.epoch})" if self.epoch else f"step {self.step_count} (the start)"

    def held(self, out: Path) -> str:
        """What ``out``/checkpoint.pt holds for a message: the position it was saved at, or that there is none."""
        if self.saved_at is None:
            return f"no checkpoint was written to {out}"
        epoch, step_in_epoch, step = self.saved_at
        where = f"epoch {epoch + 1}, step {step_in_epoch} of {len(self.loader)}" if step_in_epoch else f"the end of epoch {epoch}"
        return f"{out}/checkpoint.pt holds the finite state after step {step} ({where})"

    def model_finite(self) -> bool:
        """Whether every weight and buffer (BatchNorm statistics included) of the model is finite (one sync)."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        return bool(finite_flag(torch.zeros((), device=self.device), tensors))

    def save_checkpoint(self, out: Path, model_too: bool = False, best: bool = False) -> None:
        """checkpoint.pt (and model.pt / model_best.pt), built on every rank, written by rank 0, after checking
        the model is finite (a non-finite model is never saved over the last good checkpoint)."""
        if not self.model_finite():
            raise NumericFaultError(f"the model holds non-finite weights or BatchNorm statistics after {self.position()}, "
                                    "so it was not saved")
        state = self.state_dict()
        if self.comm.is_main:
            if best:
                checkpoint.save(out / "model_best.pt", self.model_payload())
            checkpoint.save(out / "checkpoint.pt", state)
            (out / START).unlink(missing_ok=True)  # the folder holds a run now
            if self.replacing:  # only at the end of an epoch: the new run finished one, the run it replaces goes
                drop_backup(out)
        self.replacing = False
        self.saved_at = (self.epoch, self.step_in_epoch, self.step_count)
        if not self.comm.is_main:
            return
        if model_too:
            checkpoint.save(out / "model.pt", self.model_payload())
            if self.ema is not None:
                checkpoint.save(out / "model_ema.pt", self.model_payload(ema=True))
