"""Free adversarial training (Shafahi et al. 2019): each batch replayed m times, one backward per replay
giving both the model update and the next perturbation, which carries over to the next batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from apart_fast import ops
from apart_fast.methods.base import Method
from apart_fast.step.guard import gather_grads

if TYPE_CHECKING:
    from apart_fast.data import Batch


class Free(Method):
    """m replays per batch; the perturbation persists across replays and batches."""

    name = "free"
    passes = 1  # per replay; a step is m replays, see step()
    capturable = False  # its perturbation is re-bound every replay and reset on a shape change

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes = self.cfg.free_replays
        self.data_passes_divisor = self.cfg.free_replays
        self.delta: Tensor | None = None

    def _delta_for(self, x: Tensor) -> Tensor:
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        return self.delta

    def perturb(self, batch: Batch) -> Tensor:
        return torch.clamp(batch.x + self._delta_for(batch.x), 0.0, 1.0)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        x, y, eps = batch.x, batch.y, self.cfg.eps
        out: dict[str, Tensor] = {}
        all_ok = torch.ones((), dtype=torch.bool, device=x.device)
        faults = torch.zeros((), dtype=torch.bool, device=x.device)
        for _ in range(self.cfg.free_replays):
            x_adv = torch.clamp(x + self._delta_for(x), 0.0, 1.0).requires_grad_(True)
            with self.precision.autocast():
                logits = self.model(x_adv)
                loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.scaled(loss).backward()
            # The same backward yields the input gradient for the next perturbation (its sign only).
            ok = self.finish_backward(loss, gather_grads(self.optimizer), [x_adv.grad])
            faults = faults | self.step_fault
            delta = ops.pgd_step(x_adv.detach(), x, x_adv.grad, eps, eps, backend=self.cfg.backend) - x
            self.delta = torch.where(ok, delta, self._delta_for(x))  # a faulty replay keeps the old perturbation
            self.update_model(ok)
            all_ok = all_ok & ok
            out = self.metrics(loss, logits, y)
        self.step_ok, self.step_fault = all_ok, faults
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "delta": self.delta}

    def rank_state(self) -> dict:
        # On the CPU: every rank's state is pickled to the others, and a CUDA tensor unpickles onto its
        # sender's device, so rank 0 would allocate on (and open a context for) every other rank's GPU.
        return {**super().rank_state(), "delta": None if self.delta is None else self.delta.cpu()}

    def load_rank_state(self, state: dict | None) -> None:
        super().load_rank_state(state)
        if state is not None:
            self._load_delta(state["delta"])  # a different per-rank batch size resets it (``_delta_for``)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load_delta(state["delta"])

    def _load_delta(self, delta: Tensor | None) -> None:
        """The saved perturbation on this run's device (checkpoints are read onto the CPU)."""
        self.delta = None if delta is None else delta.to(self.device)
