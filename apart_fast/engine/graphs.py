"""The steady-state training step as one CUDA graph: both APART passes, the omega gather/update,
both optimizer steps and the learning-rate schedules, replayed with no host synchronisation.

What a captured step needs, and where it comes from:

- lr and momentum as device tensors updated *inside* the step: ``DeviceSchedule`` keeps the step
  counter on the device and recomputes both from it (same float64 formula as ``CyclicSchedule``),
  and ``DeviceSGD`` (torch.optim.SGD's update, written with foreach ops that take 0-dim tensor
  scalars) reads them. torch's own SGD takes the lr as a Python number (``alpha=-lr``) and the
  momentum always as one, so its values would be frozen into the graph at capture.
- static inputs: ``GraphStep`` copies each batch into fixed buffers (the loader drops the ragged
  last batch, so the shape never changes), runs ``warmup`` eager steps on a side stream (optimizer
  state and autograd buffers get allocated, cuDNN picks its algorithms), captures one step, then
  replays it; its outputs are static tensors the loop reads like eager ones.
- the rest of the step is already sync-free: the fault flag decides on the device
  (``faults.conditional_step``), the fp16 loss scale lives on the device (``amp.LossScaler``), the
  ops never call ``.item()``; metrics are made with fill kernels, not host-to-device copies.
Eager and captured steps run the same code, so ``--no-cuda-graphs`` with ``DeviceSGD`` gives the
same numbers (``tests/engine/test_graphs.py`` checks it on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from apart_fast.data import Batch


class DeviceSGD(torch.optim.SGD):
    """SGD (momentum, weight decay, no dampening/nesterov) whose lr and momentum are 0-dim device tensors
    set by ``bind``; state and state_dict are torch.optim.SGD's, so checkpoints are interchangeable."""

    def __init__(self, params: Any, lr: float = 0.0, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.lr_t: Tensor | None = None
        self.momentum_t: Tensor | None = None

    def bind(self, lr: Tensor, momentum: Tensor) -> None:
        """Use these tensors (updated in place by a ``DeviceSchedule``) as lr and momentum from now on."""
        self.lr_t, self.momentum_t = lr, momentum

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """torch.optim.SGD's update with the bound lr and momentum tensors; ``closure`` is ignored."""
        if self.lr_t is None or self.momentum_t is None:
            raise RuntimeError("DeviceSGD.step before bind(lr, momentum); build a DeviceSchedule over it")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):  # first step (eager, during warm-up): buf = d_p, as torch's SGD
                for p, g, b in zip(params, grads, bufs):
                    if b is None:
                        self.state[p]["momentum_buffer"] = g.detach().clone()
                bufs = [self.state[p]["momentum_buffer"] for p in params]
            else:
                torch._foreach_mul_(bufs, self.momentum_t)
                torch._foreach_add_(bufs, grads)
            torch._foreach_sub_(params, torch._foreach_mul(bufs, self.lr_t))


class DeviceSchedule:
    """``CyclicSchedule`` with its counter, lr and momentum on the device (capturable); binds them to a ``DeviceSGD``."""

    def __init__(self, optimizer: DeviceSGD, total: int, peak: float, momentum: tuple[float, float]) -> None:
        dev = next(p.device for g in optimizer.param_groups for p in g["params"])
        self.optimizer, self.total, self.peak = optimizer, max(int(total), 1), float(peak)
        self.m_high, self.m_low = (float(m) for m in momentum)
        self.t = torch.zeros((), dtype=torch.float64, device=dev)
        self.lr = torch.zeros((), dtype=torch.float32, device=dev)
        self.momentum = torch.zeros((), dtype=torch.float32, device=dev)
        optimizer.bind(self.lr, self.momentum)
        self._apply()

    def _apply(self) -> None:
        half = self.total / 2
        f = torch.clamp(1.0 - (self.t - half).abs() / half, min=0.0)  # float64, as CyclicSchedule's Python floats
        self.lr.copy_(self.peak * f)
        self.momentum.copy_(self.m_high - (self.m_high - self.m_low) * f)

    def step(self) -> None:
        """Advance one iteration on the device and recompute lr and momentum in place."""
        self.t.add_(1.0)
        self._apply()

    def state_dict(self) -> dict:
        return {"t": int(self.t.item())}  # one sync, at checkpoints only

    def load_state_dict(self, state: dict) -> None:
        self.t.fill_(float(state["t"]))
        self._apply()


class GraphStep:
    """Calls ``step(batch)`` through static batch buffers: ``warmup`` eager steps on a side stream, then
    one capture, then replays. ``capture=False`` (and every CPU run) keeps calling it eagerly through
    the same buffers. ``generators``: custom CUDA generators the step draws from (PGD's random start)."""

    def __init__(self, step: Callable[[Batch], Any], capture: bool, warmup: int = 3,
                 generators: list[torch.Generator] | None = None) -> None:
        self.fn, self.capture, self.warmup = step, capture, warmup
        self.generators = generators or []
        self.static: Batch | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Any = None
        self.done = 0  # eager steps run so far

    def _load(self, batch: Batch) -> bool:
        """Copy ``batch`` into the static buffers; False when its shapes differ from theirs."""
        if self.static is None:
            self.static = Batch(**{f.name: getattr(batch, f.name).clone() for f in fields(Batch)})
            return True
        for f in fields(Batch):
            dst, src = getattr(self.static, f.name), getattr(batch, f.name)
            if dst.shape != src.shape:
                return False
        for f in fields(Batch):
            getattr(self.static, f.name).copy_(getattr(batch, f.name))
        return True

    def __call__(self, batch: Batch) -> Any:
        if not self._load(batch):
            return self.fn(batch)  # an odd-shaped batch runs eagerly (never with ragged='drop')
        assert self.static is not None
        if not self.capture or not batch.x.is_cuda:
            return self.fn(self.static)
        if self.done < self.warmup:
            side = torch.cuda.Stream(device=batch.x.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.done += 1
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                self.graph.register_generator_state(g)
            with torch.cuda.graph(self.graph):
                self.out = self.fn(self.static)  # recorded, not run: the replay below runs this batch
        self.graph.replay()
        return self.out
