"""The keep-or-undo fault guard of one training step, decided on the device with no host sync.

Every update is computed as usual, then kept or undone according to a 0-dim bool flag
(``finite_flag``: the loss and a cheap gradient norm are finite), so a non-finite step leaves the
weights, the optimizer state and the BatchNorm buffers bit-identical to before it. The loop
collects the flags (``engine.faults.FaultMonitor``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def finite_flag(loss: Tensor, tensors: Iterable[Tensor | None] = ()) -> Tensor:
    """0-dim bool on the loss's device: the loss and the summed norms of ``tensors`` are all finite.

    A NaN or inf anywhere makes its tensor's norm non-finite, so one reduction per tensor suffices.
    """
    ts = [t.detach() for t in tensors if t is not None]
    ok = torch.isfinite(loss.detach()).all()
    if ts:
        norms = torch._foreach_norm(ts)
        ok = ok & torch.isfinite(torch.stack([n.to(loss.device, torch.float32) for n in norms]).sum())
    return ok


def grads_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The ``.grad`` of every parameter the optimizer holds that has one."""
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


@torch.no_grad()
def conditional_step(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """``optimizer.step()`` kept where ``ok`` is true and undone (bit-exactly) where it is false.

    Parameters with a gradient and their optimizer state (momentum buffers) are snapshotted, the
    step runs, then ``torch.where`` picks new or old on the device. A state tensor the step
    created (SGD's first momentum buffer) is restored to zeros, which SGD treats like an absent one.
    Costs one copy of the updated parameters and their state per step; no host sync.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    saved = [p.detach().clone() for p in params]
    saved_state = [
        {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor)} for p in params
    ]
    optimizer.step()
    for p, old, old_state in zip(params, saved, saved_state):
        p.copy_(torch.where(ok, p, old))
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, Tensor):
                prev = old_state.get(k)
                v.copy_(torch.where(ok, v, prev if prev is not None else torch.zeros_like(v)))


class BufferGuard:
    """Snapshot of a model's buffers (BatchNorm running statistics) restored where a step was faulty,
    since a non-finite forward pass writes NaN into them before any check can run."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [b for b in model.buffers() if b is not None]
        self.saved: list[Tensor] = []

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy every buffer (called before each step)."""
        self.saved = [b.clone() for b in self.buffers]

    @torch.no_grad()
    def restore_unless(self, ok: Tensor) -> None:
        """Put the snapshot back where ``ok`` is False, on the device."""
        for b, old in zip(self.buffers, self.saved):
            b.copy_(torch.where(ok, b, old))
