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
    """``CyclicSchedule`` with its counter, lr and momentum on the device (capturable); binds them to a
    ``FlatSGD`` (``DeviceSGD``). Every step's (lr, momentum) is worked out once, in Python floats as
    ``CyclicSchedule`` does, into a (total + 1) x 2 table; a step is then three tiny kernels (count,
    clamp past the end, where the lr is 0 as in ``CyclicSchedule``, and one row lookup)."""

    def __init__(self, optimizer: FlatSGD, total: int, peak: float, momentum: tuple[float, float]) -> None:
        dev = next(p.device for g in optimizer.param_groups for p in g["params"])
        self.optimizer, self.total, self.peak = optimizer, max(int(total), 1), float(peak)
        self.m_high, self.m_low = (float(m) for m in momentum)
        half = self.total / 2
        rows = []
        for t in range(self.total + 1):
            f = max(0.0, 1.0 - abs(t - half) / half)
            rows.append((self.peak * f, self.m_high - (self.m_high - self.m_low) * f))
        self.table = torch.tensor(rows, dtype=torch.float32).to(dev)
        self.t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.row = torch.zeros(1, 2, dtype=torch.float32, device=dev)
        self.lr, self.momentum = self.row[0, 0], self.row[0, 1]  # 0-dim views the optimizer reads
        optimizer.bind(self.lr, self.momentum)
        self._apply()

    def _apply(self) -> None:
        torch.index_select(self.table, 0, self.t.clamp(max=self.total), out=self.row)

    def step(self) -> None:
        """Advance one iteration on the device and look up lr and momentum in place."""
        self.t.add_(1)
        self._apply()

    def state_dict(self) -> dict:
        return {"t": int(self.t.item())}  # one sync, at checkpoints only

    def load_state_dict(self, state: dict) -> None:
        self.t.fill_(int(state["t"]))
        self._apply()
