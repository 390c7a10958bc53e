"""The keep-or-undo fault guard of one training step, decided on the device with no host sync.

Every update is computed as usual, then kept or undone according to a 0-dim bool flag
(``finite_flag``: the loss, the gradients and any other tensor named are finite), so a non-finite
step leaves the weights, the optimizer state and the BatchNorm buffers bit-identical to before it.
With a ``FusedSGD`` or ``FlatSGD`` and a ``BufferGuard`` that is a handful of kernels per step for
any model size: one check covers every tensor, the update kernel skips itself (fused) or one
``torch.where`` per flat tensor keeps or undoes, and the BatchNorm buffers are one copy per dtype.
The loop collects the flags (``engine.faults.FaultMonitor``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from apart_fast.step.optim import FlatSGD, FusedSGD, flatten_into

_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A cached float32 1 on ``device`` (no fill kernel per call; made outside any graph capture on first use)."""
    if device not in _ONES:
        _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ONES[device]


def finite_flag(loss: Tensor, tensors: Iterable[Tensor | None] = ()) -> Tensor:
    """0-dim bool on the loss's device: the loss and every element of ``tensors`` are finite.

    One ``_amp_foreach_non_finite_check_and_unscale_`` (GradScaler's check) over all of them, with a
    scale of 1: multiplying by 1 changes no value, so the tensors are left as they were.
    """
    ts = [t.detach() for t in tensors if t is not None]
    ts.append(loss.detach().float())
    found = torch.zeros(1, dtype=torch.float32, device=loss.device)
    torch._amp_foreach_non_finite_check_and_unscale_(ts, found, _one(loss.device))
    return found.logical_not().reshape(())


def grads_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The ``.grad`` of every parameter the optimizer holds that has one."""
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def gather_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's gradients for unscaling, averaging across ranks and the fault check: a ``FlatSGD``'s
    one flat tensor (gathered now, the ``.grad`` tensors becoming views of it), else every ``.grad``."""
    if isinstance(optimizer, FlatSGD):
        return optimizer.gather_grads()
    return grads_of(optimizer)


@torch.no_grad()
def conditional_step(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """``optimizer.step()`` kept where ``ok`` is true and undone (bit-exactly) where it is false.

    A ``FlatSGD`` or ``FusedSGD`` does it in a few kernels (``step_if``). Any other optimizer: parameters with a
    gradient and their optimizer state (momentum buffers) are snapshotted, the step runs, then
    ``torch.where`` picks new or old on the device, per tensor. A state tensor the step created
    (SGD's first momentum buffer) is restored to zeros, which SGD treats like an absent one.
    """
    if isinstance(optimizer, (FlatSGD, FusedSGD)):
        optimizer.step_if(ok)
        return
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
    since a non-finite forward pass writes NaN into them before any check can run. ``sync_free``: restore with
    ``torch.where`` (True) or, on the CPU, by a copy only when ``ok`` is False (False); None: by the device.

    The buffers become views of one flat tensor per dtype (values, shapes and layouts unchanged; they
    stay in ``state_dict``/``load_state_dict`` as before), so a snapshot is one copy and a restore one
    ``torch.where`` per dtype, whatever the number of layers.
    """

    def __init__(self, model: nn.Module, sync_free: bool | None = None) -> None:
        self.buffers = [b for b in model.buffers() if b is not None]
        self.flats: list[Tensor] = []
        kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for b in self.buffers:
            kinds.setdefault((b.device, b.dtype), []).append(b)
        for group in kinds.values():
            flat, views = flatten_into(group)
            for b, v in zip(group, views):
                b.data = v
            self.flats.append(flat)
        self.saved: list[Tensor] = []
        # restore with torch.where, never reading ok: on an accelerator, and wherever the step may be captured
        # (``sync_free=True``: the CUDA-graph step, rehearsed on the CPU as CUDA runs it)
        self.sync_free = any(f.device.type != "cpu" for f in self.flats) if sync_free is None else sync_free

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy every buffer (called before each step)."""
        self.saved = [f.clone() for f in self.flats]

    @torch.no_grad()
    def restore_unless(self, ok: Tensor) -> None:
        """Put the snapshot back where ``ok`` is False: with ``torch.where`` on an accelerator (no sync), by a
        copy when needed on the CPU (where ``ok`` is already in host memory)."""
        if not self.sync_free and bool(ok):
            return
        for f, old in zip(self.flats, self.saved):
            if self.sync_free:
                torch.where(ok, f, old, out=f)
            else:
                f.copy_(old)
