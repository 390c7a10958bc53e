"""Mixed precision for the training step: autocast around the forward passes, and for float16 a
dynamic loss scale kept on the device.

Why not ``torch.amp.GradScaler.step``: it reads its inf flag on the host (``.item()``), one sync per
step, and it would count an overflow separately from the engine's fault mechanism. ``LossScaler``
uses the same device ops GradScaler is built on (``_amp_foreach_non_finite_check_and_unscale_``,
``_amp_update_scale_``), so it is sync-free and capturable, and an overflow simply makes the step's
keep flag False: the update is undone like any non-finite step (``step.guard``) and the scale
backs off. APART's step-size gradients come out of the same scaled backward as the model's and are
unscaled with them, before the ascent negates them; dL2/dx1 is only used through its sign, which a
positive scale does not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from apart_fast.config import AMP_MODES, ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(mode: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, none otherwise (CPU autocast is slower than fp32)."""
    if mode not in AMP_MODES:
        raise ConfigError(f"--amp {mode!r}; choose one of {', '.join(AMP_MODES)}")
    if mode != "auto":
        return mode
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "none"


class LossScaler:
    """Dynamic loss scale on the device (GradScaler's defaults): x2 after ``interval`` good steps, x0.5 on overflow."""

    def __init__(self, device: torch.device, init: float = 2.0**16, interval: int = 2000) -> None:
        self.scale = torch.full((), init, dtype=torch.float32, device=device)
        self.growth = torch.zeros((), dtype=torch.int32, device=device)
        self.interval = interval

    def scaled(self, loss: Tensor) -> Tensor:
        """The loss times the current scale."""
        return loss * self.scale.to(loss.dtype)

    @torch.no_grad()
    def unscale_(self, grads: Sequence[Tensor]) -> None:
        """Divide ``grads`` by the scale in place (non-finite values stay non-finite; the keep flag sees them)."""
        grads = [g for g in grads if g is not None]
        if grads:
            found = torch.zeros(1, dtype=torch.float32, device=self.scale.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.scale.reciprocal())

    @torch.no_grad()
    def update(self, ok: Tensor) -> None:
        """Grow or back off the scale from the step's keep flag, on the device."""
        found = (~ok).to(torch.float32).reshape(1)
        scale = self.scale.reshape(1)
        growth = self.growth.reshape(1)
        torch._amp_update_scale_(scale, growth, found, 2.0, 0.5, self.interval)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.detach().cpu(), "growth": self.growth.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.copy_(state["scale"])
        self.growth.copy_(state["growth"])


class Precision:
    """The run's precision: ``autocast()`` for forward passes and, for fp16, a ``LossScaler``."""

    def __init__(self, mode: str = "none", device: torch.device | None = None, cache: bool = True) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.mode = resolve_amp(mode, self.device)
        self.dtype = DTYPES.get(self.mode)
        self.cache = cache  # autocast's weight-cast cache; off under CUDA-graph capture
        self.scaler = LossScaler(self.device) if self.mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype on its device; a no-op in fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=self.cache)

    def scaled(self, loss: Tensor) -> Tensor:
        """The loss to differentiate: times the loss scale for fp16, unchanged otherwise."""
        return self.scaler.scaled(loss) if self.scaler is not None else loss

    def unscale_(self, grads: Sequence[Tensor]) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(grads)

    def update(self, ok: Tensor) -> None:
        if self.scaler is not None:
            self.scaler.update(ok)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


FP32 = Precision()
