"""SGD whose "keep or undo" costs a handful of kernels per step whatever the model's size, with no
host sync: ``FusedSGD`` (PyTorch's fused SGD, skipping on its ``found_inf``) for eager steps, and
``FlatSGD``/``DeviceSGD`` over flat state for the CUDA-graph step and APART's step sizes.

Measured (``benchmarks/sgd_update.py``, README): on the CPU the fused update takes about half the
time of the flat one (which first gathers the gradients with a ``cat``); but its momentum is a
Python number, which a CUDA-graph capture would freeze, so the captured step keeps ``DeviceSGD``.

``FlatSGD`` is torch.optim.SGD (momentum, weight decay, ``maximize``; no dampening/nesterov) whose
params become views of ``flat_params`` and whose ``momentum_buffer`` states are views of
``flat_momentum``; ``state_dict``/``load_state_dict`` keep torch's format, so checkpoints are
interchangeable with torch.optim.SGD's. ``step_if(ok)`` keeps the update where the 0-dim bool ``ok``
is true (``torch.where`` on an accelerator or once bound to device lr and momentum, no sync): a skipped
step leaves parameters and momentum bit-identical. lr and momentum are the param group's Python numbers
(``CyclicSchedule``) or, after ``bind``, 0-dim device tensors (``DeviceSchedule``), which a CUDA graph
capture does not freeze.

``maximize`` (gradient ascent) costs no kernel: the flat momentum holds the *negated* buffer
``-b`` (``state_dict`` and ``load_state_dict`` convert), and ``-b' = (g - wd*p) + mu*(-b)``,
``p' = p + lr*(-b')`` are the descent formulas with the signs of ``wd`` and ``lr`` flipped; IEEE
rounding is symmetric, so the values are those of negating the gradient first, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def dense_strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides where they describe a dense, non-overlapping layout (contiguous, channels_last,
    ...), else the contiguous strides: the layout ``t``'s flat copy keeps."""
    dims = sorted((d for d in range(t.dim()) if t.size(d) != 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= t.size(d)
    return t.stride()


def flatten_into(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor]]:
    """One flat tensor holding ``tensors`` (same device and dtype) and a view of it per tensor with the
    tensor's shape and dense layout; values are copied, the tensors themselves are left alone."""
    dev = tensors[0].device
    dtype = dtype or tensors[0].dtype
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=dev)
    views, offset = [], 0
    for t in tensors:
        v = flat.as_strided(t.shape, dense_strides(t), offset)
        with torch.no_grad():
            v.copy_(t)
        views.append(v)
        offset += t.numel()
    return flat, views


def flat_view(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (same shape as ``like``) as a 1-D view in ``like``'s storage order (a copy if its layout differs)."""
    if t.stride() != like.stride() or dense_strides(t) != t.stride():
        t = torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class FlatSGD(torch.optim.SGD):
    """torch.optim.SGD over one flat parameter tensor and one flat momentum tensor (see the module
    docstring). ``shared``: parameters another FlatSGD holds flat (APART's step sizes under
    ``legacy_model_decay``); they are copied into this optimizer's flat tensor and back around each step."""

    def __init__(self, params: Iterable[Tensor], lr: float = 0.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 maximize: bool = False, shared: Iterable[Tensor] = ()) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
        if len(self.param_groups) != 1:
            raise ValueError(f"FlatSGD takes one param group, got {len(self.param_groups)}; build one optimizer per group")
        self.params: list[Tensor] = list(self.param_groups[0]["params"])
        self.shared_ids = {id(p) for p in shared}
        self._flatten([torch.zeros_like(p) for p in self.params])
        self.lr_t: Tensor | None = None
        self.momentum_t: Tensor | None = None
        self._missing = [False] * len(self.params)  # which parameters had no gradient at the last gather
        self._masks: dict[tuple[bool, ...], Tensor] = {}

    def _flatten(self, momentum: list[Tensor]) -> None:
        """Make the parameters (but the shared ones) and ``momentum`` views of two new flat tensors."""
        kinds = {(str(p.device), p.dtype) for p in self.params}
        if len(kinds) != 1:
            raise ValueError(f"FlatSGD needs its parameters on one device in one dtype, got {sorted(map(str, kinds))}; "
                             "move or cast them all (model.to(...)) or build one optimizer per kind")
        self.flat_params, self.views = flatten_into(self.params)
        self.shared = [(v, p) for v, p in zip(self.views, self.params) if id(p) in self.shared_ids]  # (slot, parameter)
        for v, p in zip(self.views, self.params):
            if id(p) not in self.shared_ids:
                p.data = v
        self.flat_momentum, self.momentum_views = flatten_into(momentum, self.flat_params.dtype)
        for p, m in zip(self.params, self.momentum_views):
            self.state[p]["momentum_buffer"] = m
        self.flat_grads: Tensor | None = None
        self.grad_views: list[Tensor] = []  # the ``.grad`` of each parameter as a view of ``flat_grads``
        # Persistent work space (gathered gradients, new momentum, new parameters): no allocation per step,
        # fixed addresses for a CUDA graph.
        self._grad_buf, self._m_new, self._p_new = (torch.empty_like(self.flat_params) for _ in range(3))
        self.sync_free = self.flat_params.device.type != "cpu"  # keep-or-undo with torch.where, never reading ok

    def _follow_params(self) -> None:
        """Flatten again (momentum kept) where a parameter's tensor was replaced since (``p.data = ...``,
        ``model.to(...)``): the update must reach the tensors the model now uses."""
        if any(p.data_ptr() != v.data_ptr() or p.dtype != v.dtype
               for p, v in zip(self.params, self.views) if id(p) not in self.shared_ids):
            self._flatten([m.to(p.dtype) for p, m in zip(self.params, self.momentum_views)])

    def bind(self, lr: Tensor, momentum: Tensor) -> None:
        """Use these 0-dim device tensors (updated in place by a ``DeviceSchedule``) as lr and momentum from now on.

        A bound optimizer is on the capturable path, so it keeps or undoes with ``torch.where`` on every device:
        ``--cuda-graphs`` on the CPU (and the capture checker, ``engine.capture_check``) runs the branch CUDA runs."""
        self.lr_t, self.momentum_t = lr, momentum
        self.sync_free = True

    @torch.no_grad()
    def gather_grads(self) -> list[Tensor]:
        """Copy every ``.grad`` into ``flat_grads`` (one ``cat``; zeros where a gradient is None) and make each
        ``.grad`` a view of it, so that in-place changes (unscaling, the cross-rank average) reach the update."""
        self._follow_params()
        if self.grad_views and all(p.grad is (None if absent else v)
                                   for p, v, absent in zip(self.params, self.grad_views, self._missing)):
            return [self._grad_buf]  # gathered already (or accumulated into the views in place since)
        missing = [p.grad is None for p in self.params]
        parts = [torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None else flat_view(p.grad, p)
                 for p in self.params]
        self.flat_grads = torch.cat(parts, out=self._grad_buf)
        self.grad_views = [self.flat_grads.as_strided(m.shape, m.stride(), m.storage_offset()) for m in self.momentum_views]
        for p, g, absent in zip(self.params, self.grad_views, missing):
            if not absent:
                p.grad = g
        self._missing = missing
        return [self.flat_grads]

    def _keep_mask(self, ok: Tensor | None) -> Tensor | None:
        """Where to keep the new values: ``ok``, less the parameters that had no gradient (SGD skips them)."""
        if not any(self._missing):
            return ok
        key = tuple(self._missing)
        if key not in self._masks:
            self._masks[key] = torch.cat([torch.full((p.numel(),), not absent, dtype=torch.bool, device=p.device)
                                          for p, absent in zip(self.params, self._missing)])
        mask = self._masks[key]
        return mask if ok is None else mask & ok

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """One SGD update, always kept; ``closure`` is ignored."""
        self.step_if(None)

    @torch.no_grad()
    def step_if(self, ok: Tensor | None) -> None:
        """One SGD update, kept where the 0-dim bool ``ok`` is true (None: always) and undone bit-exactly
        otherwise; parameters without a gradient are left alone, as torch.optim.SGD does.

        On an accelerator, and once ``bind``-ed on any device, the new values are computed beside the old ones
        and ``torch.where`` keeps one or the other (no sync, capturable). Otherwise, on the CPU, ``ok`` is
        already in host memory, so the update runs in place or not at all (same values: the same ops write
        into other buffers).
        """
        group = self.param_groups[0]
        self.gather_grads()
        assert self.flat_grads is not None
        keep = self._keep_mask(ok)
        in_place = keep is None or (not self.sync_free and keep.dim() == 0)
        if in_place and keep is not None and not bool(keep):
            return
        P, M, G = self.flat_params, self.flat_momentum, self.flat_grads
        for slot, p in self.shared:
            slot.copy_(p)
        sign = -1.0 if group["maximize"] else 1.0  # maximize: M holds -momentum, see the module docstring
        wd = group["weight_decay"]
        m_new = M if in_place else self._m_new
        p_new = P if in_place else self._p_new
        d = torch.add(G, P, alpha=sign * wd, out=self._m_new) if wd else G
        if self.lr_t is not None and self.momentum_t is not None:
            torch.addcmul(d, M, self.momentum_t, out=m_new)
            torch.addcmul(P, m_new, self.lr_t, value=-sign, out=p_new)
        else:
            if group["momentum"]:
                torch.add(d, M, alpha=group["momentum"], out=m_new)
            else:
                m_new.copy_(d)
            torch.add(P, m_new, alpha=-sign * group["lr"], out=p_new)
        if not in_place:
            torch.where(keep, p_new, P, out=P)
            torch.where(keep, m_new, M, out=M)
        for slot, p in self.shared:
            p.copy_(slot)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.SGD's ``state_dict`` (with ``maximize``, the momentum buffers un-negated: copies)."""
        sd = super().state_dict()
        if self.param_groups[0]["maximize"]:
            sd["state"] = {i: {**s, "momentum_buffer": -s["momentum_buffer"]} if "momentum_buffer" in s else s
                           for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim.SGD's ``load_state_dict``, the momentum buffers copied into (and kept as) flat views."""
        maximize = self.param_groups[0]["maximize"]
        super().load_state_dict(state_dict)
        self.param_groups[0]["maximize"] = maximize  # how this optimizer is used, not a saved hyperparameter
        with torch.no_grad():
            for p, m in zip(self.params, self.momentum_views):
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    m.zero_()
                else:
                    m.copy_(-buf if maximize else buf)
                self.state[p]["momentum_buffer"] = m


class DeviceSGD(FlatSGD):
    """``FlatSGD`` that must be ``bind``-ed to device lr and momentum tensors before stepping (the CUDA-graph step)."""

    @torch.no_grad()
    def step_if(self, ok: Tensor | None) -> None:
        if self.lr_t is None or self.momentum_t is None:
            raise RuntimeError("DeviceSGD.step before bind(lr, momentum); build a DeviceSchedule over it")
        super().step_if(ok)


class FusedSGD(torch.optim.SGD):
    """torch.optim.SGD with ``fused=True`` (PyTorch's one-kernel update over all tensors of a device and
    dtype), the eager model optimizer. ``step_if(ok)`` hands ``not ok`` to the kernel as its ``found_inf``
    (GradScaler's mechanism): the kernel itself skips the update, on the device, leaving parameters and
    momentum bit-identical. Momentum buffers are zeros from the start (SGD's first step, ``buf = g``, is
    ``0 * mu + g``), so a skipped first step leaves a valid buffer, not ``empty_like`` garbage."""

    def __init__(self, params: Iterable[Tensor], lr: float = 0.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 maximize: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize, fused=True)
        self._zero_missing_buffers()

    def _zero_missing_buffers(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if group["momentum"] and self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step_if(self, ok: Tensor | None) -> None:
        """One fused SGD update, skipped by the kernel where the 0-dim bool ``ok`` is false (None: always kept)."""
        if ok is None:
            self.step()
            return
        self.found_inf = ok.logical_not().to(torch.float32).reshape(1)
        try:
            self.step()
        finally:
            del self.found_inf

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim.SGD's, staying fused (a checkpoint of an unfused SGD loads too)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
        self._zero_missing_buffers()
