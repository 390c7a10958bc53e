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
    """m replays per batch; the perturbation persists across replays and batches.

    The perturbation lives in one buffer of the batch's shape (Shafahi et al.'s global noise), updated in place: a
    batch uses its first B rows, so a smaller last batch (``--keep-last-batch``) carries those rows over, and the
    buffer keeps its address, which a CUDA-graph step reads and writes at every replay. It is replaced (zeros) only
    when a batch is larger or has another image shape.
    """

    name = "free"
    passes = 1  # per replay; a step is m replays, see step()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes = self.cfg.free_replays
        self.data_passes_divisor = self.cfg.free_replays
        self.delta: Tensor | None = None

    def _delta_for(self, x: Tensor) -> Tensor:
        """The perturbation of ``x``'s examples: a view of the first ``len(x)`` rows of the buffer."""
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < x.shape[0]:
            self.delta = torch.zeros_like(x)
        return self.delta[: x.shape[0]]

    def perturb(self, batch: Batch) -> Tensor:
        return torch.clamp(batch.x + self._delta_for(batch.x), 0.0, 1.0)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        x, y, eps = batch.x, batch.y, self.cfg.eps
        delta = self._delta_for(x)
        out: dict[str, Tensor] = {}
        all_ok = torch.ones((), dtype=torch.bool, device=x.device)
        faults = torch.zeros((), dtype=torch.bool, device=x.device)
        for _ in range(self.cfg.free_replays):
            x_adv = torch.clamp(x + delta, 0.0, 1.0).requires_grad_(True)
            with self.precision.autocast():
                logits = self.model(x_adv)
                loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.scaled(loss).backward()
            # The same backward yields the input gradient for the next perturbation (its sign only).
            ok = self.finish_backward(loss, gather_grads(self.optimizer), [x_adv.grad])
            faults = faults | self.step_fault
            new = ops.pgd_step(x_adv.detach(), x, x_adv.grad, eps, eps, backend=self.cfg.backend) - x
            delta.copy_(torch.where(ok, new, delta))  # a faulty replay keeps the old perturbation
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
            self._load_delta(state["delta"])  # a larger per-rank batch or another image shape replaces it (``_delta_for``)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load_delta(state["delta"])

    def _load_delta(self, delta: Tensor | None) -> None:
        """The saved perturbation on this run's device (checkpoints are read onto the CPU), copied into the buffer
        in place where it has the buffer's shape."""
        if delta is not None and self.delta is not None and delta.shape == self.delta.shape:
            self.delta.copy_(delta)
        else:
            self.delta = None if delta is None else delta.to(self.device)
