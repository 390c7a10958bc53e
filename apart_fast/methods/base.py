"""The interface every training method shares, so the engine never branches on a method's name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast.config import Config
from apart_fast.step.amp import FP32, Precision
from apart_fast.step.distributed import LOCAL, Comm
from apart_fast.step.guard import conditional_step, gather_grads
from apart_fast.step.schedule import CyclicSchedule

if TYPE_CHECKING:
    from apart_fast.data import Batch


@dataclass
class DataInfo:
    """What a method needs to know about the training data."""

    n_train: int
    channels: int
    height: int
    width: int
    pad: int
    channels_last: bool = False  # batches (and per-example stores) in channels_last memory format, as the model


class Method:
    """One training method: ``step(batch)`` does one update and returns on-device metric sums.

    A method owns the model's optimizer step (Free replays it, APART adds a second optimizer) but
    not the optimizer itself, which the engine builds and checkpoints. Every update is kept only
    where its loss and gradients are finite (``step.guard.conditional_step``, decided on the
    device); ``step_ok`` is the step's 0-dim bool flag, which the engine reads at log intervals.

    The engine may set ``precision`` (autocast and the fp16 loss scale, ``step.amp``) and ``comm``
    (the process group, ``step.distributed``): every update backward goes through
    ``finish_backward``, which unscales, averages the gradients across ranks and decides the flag.
    """

    name: ClassVar[str]
    passes: ClassVar[int]  # forward+backward passes per step, for the cost report
    data_passes_divisor: ClassVar[int] = 1  # Free divides the number of passes over the data
    capturable: ClassVar[bool] = True  # one step can be captured in a CUDA graph (engine/graphs.py)

    def __init__(self, model: nn.Module, cfg: Config, info: DataInfo, device: torch.device) -> None:
        self.model, self.cfg, self.info, self.device = model, cfg.resolved(), info, torch.device(device)  # steps from eps
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: CyclicSchedule | None = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed + 1)
        self.step_ok: Tensor | None = None  # set by every step: False where its update was skipped
        self.step_fault: Tensor | None = None  # True where the skip was a numeric fault (not an fp16 overflow)
        self.precision: Precision = FP32
        self.comm: Comm = LOCAL

    def attach(self, optimizer: torch.optim.Optimizer, schedule: CyclicSchedule, total_steps: int) -> None:
        """Give the method the model optimizer and its schedule (called once by the engine)."""
        self.optimizer, self.schedule = optimizer, schedule

    def use(self, precision: Precision, comm: Comm) -> None:
        """Train with ``precision`` in process group ``comm``; rank r > 0 reseeds its random starts (its own examples)."""
        self.precision, self.comm = precision, comm
        if comm.rank:
            self.generator.manual_seed(self.cfg.seed + 1 + 7919 * comm.rank)

    def extra_model_params(self) -> list[nn.Parameter]:
        """Parameters beyond the model's that the model optimizer must also hold (usually none)."""
        return []

    @property
    def linf_bound(self) -> float:
        """The largest L-inf distance of ``perturb``'s output from the clean input (eps; N-FGSM's exceeds it)."""
        return self.cfg.eps

    def perturb(self, batch: Batch) -> Tensor:
        """The input this method trains on for ``batch`` (no parameter update)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> dict[str, Tensor]:
        """One training update; returns summed loss, correct count and example count as device tensors."""
        x_adv = self.perturb(batch).detach()
        return self.descend(x_adv, batch.y)

    def descend(self, x_in: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Forward, backward and one model-optimizer step on ``x_in``."""
        with self.precision.autocast():
            logits = self.model(x_in)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaled(loss).backward()
        self.step_ok = self.finish_backward(loss, gather_grads(self.optimizer))
        self.update_model(self.step_ok)
        return self.metrics(loss, logits, y)

    def update_model(self, ok: Tensor) -> None:
        """The model optimizer's step, kept where ``ok`` and undone on the device otherwise; then the
        fp16 loss scale and the lr/momentum schedule advance."""
        conditional_step(self.optimizer, ok)
        self.precision.update(ok)
        self.schedule.step()

    def finish_backward(self, loss: Tensor, grads: list[Tensor], local: list[Tensor | None] | tuple = ()) -> Tensor:
        """After an update backward: unscale (fp16), average ``grads`` across ranks, and return the keep
        flag, the same on every rank (True where the loss, the gradients and the rank-local tensors
        ``local`` are finite everywhere). Sets ``step_fault``: a skipped step counts as a numeric
        fault unless it was an fp16 overflow (finite loss on every rank, non-finite scaled gradients).
        The model's floating-point buffers count as ``local`` too: a forward pass can write inf into
        BatchNorm running statistics while the loss stays finite, and such a step must be undone."""
        self.precision.unscale_(grads)
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        scaled = self.precision.scaler is not None
        ok, loss_ok = self.comm.reduce_grads_and_flag(loss, grads, [*local, *buffers], loss_flag=scaled)
        self.step_fault = ~ok & ~loss_ok if scaled and loss_ok is not None else ~ok
        return ok

    @staticmethod
    def metrics(loss: Tensor, logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        """On-device sums for the running epoch metrics: loss times count, correct predictions, count."""
        n = y.numel()
        return {
            "loss": loss.detach() * n,
            "correct": (logits.detach().argmax(1) == y).sum(),
            "n": torch.full((), n, dtype=torch.int64, device=y.device),  # a fill kernel: capturable, no H2D copy
        }

    def input_grad(self, x_adv: Tensor, y: Tensor) -> Tensor:
        """dCE/dx at ``x_adv``: input gradient only, no parameter gradient accumulated."""
        x_adv = x_adv.detach().requires_grad_(True)
        with self.precision.autocast():
            loss = F.cross_entropy(self.model(x_adv), y)
        # fp16: the scaled loss keeps small gradients from underflowing; only their sign is used.
        return torch.autograd.grad(self.precision.scaled(loss), x_adv)[0]

    def uniform_start(self, x: Tensor, eps: float) -> Tensor:
        """x + U(-eps, eps) noise from the method's own generator, clamped to [0,1]."""
        noise = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return torch.clamp(x + (2 * noise - 1) * eps, 0.0, 1.0)

    def describe(self) -> list[str]:
        """Lines for the run's log about what the method built (APART: its sites and its store)."""
        return []

    def log_values(self) -> dict[str, float]:
        """Per-epoch values worth logging besides loss and accuracy (APART's step sizes)."""
        return {}

    def state_dict(self) -> dict:
        """The method's own state for a checkpoint (the engine saves the model and its optimizer)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; called after ``attach``."""
        self.generator.set_state(state["generator"])

    def rank_state(self) -> dict:
        """The state that differs between ranks (random starts drawn for the rank's own examples)."""
        return {"generator": self.generator.get_state()}

    def load_rank_state(self, state: dict | None) -> None:
        """Restore ``rank_state``; None (a rank the checkpoint did not have) keeps the fresh per-rank seed."""
        if state is not None:
            self.generator.set_state(state["generator"])
