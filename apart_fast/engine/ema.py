"""Weight averaging (``--ema DECAY``): an exponential moving average of the model, updated after every step.

The average is a ``torch.optim.swa_utils.AveragedModel`` (its deep copy of the model, its ``n_averaged``
counter, its state_dict) with ``use_buffers=True``, so BatchNorm's running mean and variance are averaged
with the same decay as the weights: the averaged statistics then describe the activations of the recent
models the averaged weights come from (the integer ``num_batches_tracked`` is copied, not averaged).

The update is ``ema_multi_avg_fn`` in AveragedModel's ``multi_avg_fn`` form, but ``WeightAverage.update``
calls it itself instead of ``AveragedModel.update_parameters``: that method reads ``n_averaged`` on the host
twice per call (``bool(n_averaged == 0)``, ``if n_averaged > 0``), a device sync every step and an error
under CUDA-graph capture. Here the first average is the copy made at construction (as update_parameters'
first call would make it), and every later update is foreach ops whose decay is computed on the device
from ``n_averaged``, so the update is captured with the step (``graphs.GraphStep``) and never syncs.
``tests/engine/test_ema.py`` checks that it matches ``update_parameters`` exactly.

Warm-up: the n-th update (n models averaged so far) uses decay min(DECAY, n / (n + W)), W = ``--ema-warmup``;
early on the average follows the model closely instead of staying near the random initialisation, and
after about W * DECAY / (1 - DECAY) updates (9,990 for 0.999 and W = 10) the decay is DECAY.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ema_multi_avg_fn(decay: float, warmup: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """An AveragedModel ``multi_avg_fn``: ema += (1 - d) * (model - ema), d = min(decay, n / (n + warmup))
    from the device tensor n; integer tensors are copied."""

    @torch.no_grad()
    def update(ema: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        if not ema:
            return
        if not ema[0].is_floating_point():
            torch._foreach_copy_(ema, current)
            return
        n = n_averaged.to(torch.float32)  # >= 1: the first average is a copy
        # 1 - d = max(1 - decay, W / (n + W)), formed directly: 1 - d in float32 would lose ~1e-5 of it
        w = torch.clamp(warmup / (n + warmup), min=1.0 - decay)
        diff = torch._foreach_sub(current, ema)
        torch._foreach_mul_(diff, w.to(ema[0].dtype))
        torch._foreach_add_(ema, diff)

    return update


class WeightAverage:
    """The EMA of ``model``'s parameters and buffers, on the model's device."""

    def __init__(self, model: nn.Module, decay: float, warmup: float) -> None:
        self.decay, self.warmup = float(decay), float(warmup)
        self.fn = ema_multi_avg_fn(self.decay, self.warmup)
        self.averaged = AveragedModel(model, multi_avg_fn=self.fn, use_buffers=True)
        device = next(iter(model.parameters()), torch.zeros(())).device
        self.averaged.to(device)
        self.averaged.n_averaged.fill_(1)  # the copy is the first average, as update_parameters' first call makes it
        self._pairs: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._source = model

    @property
    def module(self) -> nn.Module:
        """The averaged model (the same class as the trained one), for evaluation and saving."""
        return self.averaged.module

    def _groups(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        """(average, model) tensor lists grouped by dtype; built once (the tensors are updated in place)."""
        if self._pairs is None:
            groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
            ours = [*self.module.parameters(), *self.module.buffers()]
            theirs = [*self._source.parameters(), *self._source.buffers()]
            if len(ours) != len(theirs):
                raise RuntimeError("the averaged model and the model hold different tensors; build WeightAverage again")
            for a, m in zip(ours, theirs):
                ga, gm = groups.setdefault(a.dtype, ([], []))
                ga.append(a.detach())
                gm.append(m.detach())
            self._pairs = list(groups.values())
        return self._pairs

    @torch.no_grad()
    def update(self) -> None:
        """Average the model's current weights in: device-side foreach ops, no host sync, capturable."""
        for ema, current in self._groups():
            self.fn(ema, current, self.averaged.n_averaged)
        self.averaged.n_averaged.add_(1)

    def state_dict(self) -> dict:
        """The averaged weights, buffers and count (AveragedModel's state_dict), for checkpoints."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` exactly (in place: the grouped tensor lists stay valid)."""
        self.averaged.load_state_dict(state)

