"""The device-scalar SGD a capturable step needs: lr and momentum as 0-dim device tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


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
