"""``PerturbSite``: the marker that says "APART perturbs this activation", usable in any model.

Put ``PerturbSite()`` on the activation a residual block feeds to its first convolution (in a
PreAct block, ``relu(bn1(x))``); the shortcut must take the block's unperturbed input. A site is
the identity until a method arms it:

- ``record``: keeps a reference to its input so the method can take ``dL/dh`` with
  ``torch.autograd.grad`` (pass 1);
- ``apply``: returns ``h + alpha * sign`` through the fused ``layer_perturb`` op (pass 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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

    def forward(self, h: Tensor) -> Tensor:
        if self.mode == "record":
            self.recorded = h
            return h
        if self.mode == "apply":
            return ops.layer_perturb(h, self.sign, self.alpha, backend=self.backend)
        return h

    def disarm(self) -> None:
        """Back to identity, dropping every tensor the site held."""
        self.mode, self.recorded, self.sign, self.alpha = "off", None, None, None


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


__all__ = ["PerturbSite", "applying", "find_sites", "recording"]
