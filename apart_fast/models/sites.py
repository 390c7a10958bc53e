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

Sites attached from outside (``attach.py``) run the same two modes through hooks on the layer the
activation feeds (``PerturbSite.hook``): a forward pre-hook records or perturbs that layer's input only,
so whatever else reads the activation (a shortcut, a residual stream) reads it unperturbed; under
reduced-precision autocast a forward hook adds ``alpha * layer(sign)`` to the layer's output instead
(convolutions and linear layers, biased or not), or reruns a layer that is not linear (an attention)
in fp32 on the perturbed input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
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
            if layer is not None and reduced_autocast(h):
                shift = linear_shift(layer, self.sign)
                if shift is not None:
                    return layer(h).float() + self.alpha * shift.float()
            h = ops.layer_perturb(h, self.sign, self.alpha, backend=self.backend)
        return layer(h) if layer is not None else h

    def hook(self, layer: nn.Module) -> list[Any]:
        """Act on ``layer``'s first input from outside: a forward pre-hook (record, apply) and a forward hook
        (apply under reduced-precision autocast); returns their handles. The site's own module must live
        in the model too (``attach.py`` makes it a child of ``layer``), so that ``find_sites`` sees it."""
        return [layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                layer.register_forward_hook(self._post_hook, with_kwargs=True)]

    def _pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Record or perturb the layer's first input; every other argument that *is* that tensor (an
        attention's query, key and value) is replaced by the same result."""
        if self.mode == "off" or not args:
            return None
        h = args[0]
        if self.mode == "record":
            new = self._record(h)
        elif reduced_autocast(h):
            return None  # the forward hook perturbs the output exactly
        else:
            new = ops.layer_perturb(h, self.sign, self.alpha, backend=self.backend)
        return tuple(new if a is h else a for a in args), kwargs

    def _post_hook(self, layer: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        """Under reduced-precision autocast (apply only): ``out + alpha * layer(sign)`` in fp32 for a linear
        layer, else the layer rerun in fp32 on ``h + alpha * sign`` (its autocast output is discarded)."""
        if self.mode != "apply" or not args or not reduced_autocast(args[0]):
            return None
        shift = linear_shift(layer, self.sign)
        if shift is not None:
            return out.float() + self.alpha * shift.float()
        h = args[0]
        with torch.autocast(h.device.type, enabled=False):
            new = ops.layer_perturb(h.float(), self.sign, self.alpha, backend=self.backend)
            full = tuple(new if a is h else _fp32(a) for a in args)
            return layer.forward(*full, **{k: _fp32(v) for k, v in kwargs.items()})

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


def linear_shift(layer: nn.Module, sign: Tensor) -> Tensor | None:
    """``layer(sign) - layer(0)``, the effect of a unit perturbation ``sign`` on a convolution or linear layer
    (its bias left out), or None for any other layer. The sign (-1, 0, 1) is exact in every dtype."""
    s = sign.to(torch.float32)
    if isinstance(layer, nn.Linear):
        return F.linear(s, layer.weight)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # any padding mode is linear too
        return layer._conv_forward(s, layer.weight, None)
    return None


def _fp32(v: Any) -> Any:
    """A 16-bit float tensor as fp32, anything else as it is."""
    return v.float() if isinstance(v, Tensor) and v.dtype in (torch.bfloat16, torch.float16) else v


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


__all__ = ["PerturbSite", "applying", "find_sites", "full_precision", "linear_shift", "recording", "reduced_autocast"]
