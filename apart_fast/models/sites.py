"""``PerturbSite``: the marker that says "APART perturbs this activation", usable in any model.

Put ``PerturbSite()`` on the activation a residual block feeds to its first convolution (in a
PreAct block, ``relu(bn1(x))``); the shortcut must take the block's unperturbed input. A site is
the identity until a method arms it:

- ``record``: returns (and keeps) an alias of its input, so the method can take ``dL/dh`` along the
  site's own path with ``torch.autograd.grad`` (pass 1), in eager and compiled models alike;
- ``apply``: returns ``h + alpha * sign`` through the fused ``layer_perturb`` op (pass 2).

Reduced precision: under bf16 autocast, ``h + alpha*sign`` rounds back to ``h`` wherever ``|alpha|`` is
below half the bf16 spacing at ``|h|`` (2^-8 relative: 0.004 at |h| = 1), yet ``dL/dalpha`` is
computed as if it had been applied. Called as ``site(h, layer)`` with the bias-free linear layer the
activation feeds (the block's first convolution), a site under reduced-precision autocast returns
``layer(h) + alpha * layer(sign)`` with the sum in fp32 instead: equal in exact arithmetic, and the
perturbation's effect keeps the layer's relative precision instead of vanishing (one extra
convolution per site in pass 2). ``full_precision`` runs a layer in fp32 under autocast (the stem,
so that the input perturbation, 8/255 = 2-4 bf16 steps near 0.5-1, is not quantised).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from apart_fast import ops


class PerturbSite(nn.Module):
    """Identity module marking a layer-wise perturbation site (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "off"
        self.recorded: Tensor | None = None
        self.sign: Tensor | None = None
        self.alpha: Tensor | None = None
        self.backend = "auto"

    def forward(self, h: Tensor, layer: nn.Module | None = None) -> Tensor:
        """``h`` (perturbed when applying), or ``layer`` of it when given (see the module docstring)."""
        if self.mode == "record":
            h = self._record(h)
        elif self.mode == "apply":
            if layer is not None and reduced_autocast(h) and getattr(layer, "bias", None) is None:
                base = layer(h)
                shift = layer(self.sign.to(torch.float32))  # -1, 0, 1: exact in any dtype
                return base.float() + self.alpha * shift.float()
            h = ops.layer_perturb(h, self.sign, self.alpha, backend=self.backend)
        return layer(h) if layer is not None else h

    @torch.compiler.disable
    def _record(self, h: Tensor) -> Tensor:
        """Return an alias of ``h`` and keep it: dL/d(alias) is the gradient that reaches the first conv
        through the site only (not the shortcut, which may read ``h`` too), the direction pass 2 perturbs.
        Run outside any compiled graph (a graph break): inside one, the kept tensor would be a side output
        that the loss does not depend on, and ``autograd.grad(loss, kept)`` would fail."""
        self.recorded = h.view_as(h)
        return self.recorded

    def disarm(self) -> None:
        """Back to identity, dropping every tensor the site held."""
        self.mode, self.recorded, self.sign, self.alpha = "off", None, None, None


def reduced_autocast(x: Tensor) -> bool:
    """Whether autocast to a 16-bit float type is active for ``x``'s device."""
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in (torch.bfloat16, torch.float16)


def full_precision(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` in fp32 even under autocast, so that a small perturbation of ``x`` is not rounded away."""
    if not reduced_autocast(x):
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def find_sites(model: nn.Module) -> list[PerturbSite]:
    """All sites of ``model`` in registration (forward) order."""
    return [m for m in model.modules() if isinstance(m, PerturbSite)]


@contextmanager
def recording(sites: list[PerturbSite]) -> Iterator[None]:
    """Sites record their inputs inside the block; disarmed on exit, even on error."""
    for s in sites:
        s.mode = "record"
    try:
        yield
    finally:
        for s in sites:
            s.mode = "off"


@contextmanager
def applying(sites: list[PerturbSite], signs: list[Tensor], alphas: list[Tensor], backend: str = "auto") -> Iterator[None]:
    """Sites add ``alpha * sign`` to their inputs inside the block; disarmed on exit, even on error."""
    if len(signs) != len(sites) or len(alphas) != len(sites):
        raise ValueError(f"got {len(signs)} signs and {len(alphas)} step sizes for {len(sites)} sites; pass one of each per site")
    for s, sg, a in zip(sites, signs, alphas):
        s.mode, s.sign, s.alpha, s.backend = "apply", sg, a, backend
    try:
        yield
    finally:
        for s in sites:
            s.disarm()


__all__ = ["PerturbSite", "applying", "find_sites", "full_precision", "recording", "reduced_autocast"]
