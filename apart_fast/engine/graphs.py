"""The steady-state training step as one CUDA graph: both APART passes, the omega gather/update,
both optimizer steps and the learning-rate schedules, replayed with no host synchronisation.

What a captured step needs, and where it comes from:

- lr and momentum as device tensors updated *inside* the step (``step.schedule``, ``step.optim``):
  ``DeviceSchedule`` keeps the step counter on the device and recomputes both from it (same float64
  formula as ``CyclicSchedule``), and ``DeviceSGD`` (SGD over flat parameter and momentum tensors,
  with 0-dim tensor scalars) reads them. torch's own SGD, fused included, takes the momentum as a
  Python number, so its value would be frozen into the graph at capture.
- static inputs: ``GraphStep`` copies each batch into fixed buffers (the loader drops the ragged
  last batch, so the shape never changes), runs ``warmup`` eager steps on a side stream (optimizer
  state and autograd buffers get allocated, cuDNN picks its algorithms), captures one step, then
  replays it; its outputs are static tensors the loop reads like eager ones.
- the rest of the step is already sync-free: the fault flag decides on the device
  (``step.guard.conditional_step``: ``torch.where`` over the flat tensors), the fp16 loss scale lives on
  the device (``step.amp.LossScaler``), the ops never call ``.item()``; metrics are made with fill
  kernels, not host-to-device copies.
Eager and captured steps run the same code, so ``--no-cuda-graphs`` with ``DeviceSGD`` gives the
same numbers (``tests/engine/test_graphs.py`` checks it on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

from apart_fast.data import Batch


class GraphStep:
    """Calls ``step(batch)`` through static batch buffers: ``warmup`` eager steps on a side stream, then
    one capture, then replays. ``capture=False`` (and every CPU run) keeps calling it eagerly through
    the same buffers. ``generators``: the method's own generators the step draws from (random starts),
    registered with the graph on CUDA (a draw from any other generator would replay frozen numbers)."""

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
