"""Triangular cyclic schedule (0 -> peak -> 0 over the whole run), stepped per iteration.

It matches CyclicLR(base_lr=0, max_lr=peak, step_size_up=step_size_down=total/2) and cycles the
momentum the other way (high -> low -> high), as CyclicLR does by default.
"""

from __future__ import annotations

import torch

from apart_fast.step.optim import FlatSGD


class CyclicSchedule:
    """Sets lr and momentum of every param group of ``optimizer`` before each of ``total`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, peak: float, momentum: tuple[float, float]) -> None:
        self.optimizer, self.total, self.peak = optimizer, max(int(total), 1), peak
        self.m_high, self.m_low = momentum
        self.t = 0
        self._apply()

    def fraction(self) -> float:
        """Position in the cycle: 0 at both ends, 1 at the peak."""
        half = self.total / 2
        return max(0.0, 1.0 - abs(self.t - half) / half)

    def _apply(self) -> None:
        f = self.fraction()
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak * f
            if "momentum" in group:
                group["momentum"] = self.m_high - (self.m_high - self.m_low) * f

    def step(self) -> None:
        """Advance one iteration and set the next lr and momentum."""
        self.t += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self._apply()


class DeviceSchedule:
    """``CyclicSchedule`` with its counter, lr and momentum on the device (capturable); binds them to a ``FlatSGD`` (``DeviceSGD``)."""

    def __init__(self, optimizer: FlatSGD, total: int, peak: float, momentum: tuple[float, float]) -> None:
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
