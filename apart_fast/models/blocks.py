"""Building blocks shared by every model: input normalisation and the pre-activation residual block.

The block carries a :class:`~apart_fast.models.sites.PerturbSite` on ``relu(bn1(x))``, the activation
it feeds to its first convolution, and its shortcut always takes the *unperturbed* input (APART's rule):
``relu(bn1(x))`` for the projection in the common PreAct block (``shortcut="act"``), the raw block input
``x`` in the APART script's own block (``shortcut="raw"``). Identity shortcuts take ``x`` in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast.config import SHORTCUTS
from apart_fast.models.sites import PerturbSite


def _as_list(v: Sequence[float] | Tensor | None) -> list[float] | None:
    """Plain list of floats (or None) so model configs stay JSON/pickle friendly."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        return [float(t) for t in v.flatten().tolist()]
    if isinstance(v, (int, float)):
        return [float(v)]
    return [float(t) for t in v]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std kept as buffers so checkpoints carry them.

    Placed first inside every model so that models always take images in [0, 1];
    ``mean=None`` (and ``std=None``) makes it the identity, as in the APART script.
    """

    def __init__(
        self, mean: Sequence[float] | Tensor | None = None, std: Sequence[float] | Tensor | None = None
    ) -> None:
        super().__init__()
        mean_l, std_l = _as_list(mean), _as_list(std)
        if (mean_l is None) != (std_l is None):
            raise ValueError("Normalize needs both mean and std, or neither (no normalisation)")
        if mean_l is not None and std_l is not None:
            if len(mean_l) != len(std_l):
                raise ValueError(f"mean has {len(mean_l)} values but std has {len(std_l)}; give one per channel")
            if any(s <= 0 for s in std_l):
                raise ValueError(f"std must be positive, got {std_l}")
            self.register_buffer("mean", torch.tensor(mean_l).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std_l).view(1, -1, 1, 1))
        else:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        if self.mean is None or self.std is None:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class PreActBlock(nn.Module):
    """Pre-activation residual block with an APART perturbation site.

    ``a = relu(bn1(x))``; ``out = conv2(relu(bn2(conv1(site(a)))))``; the shortcut is a 1x1 projection of
    ``a`` (taken *before* the site; ``shortcut="raw"``: of ``x``) when the shape changes, else the identity on ``x``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "act") -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        self.raw_shortcut = shortcut == "raw"
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.site = PerturbSite()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(x if self.raw_shortcut else a)
        out = self.site(a, self.conv1)  # conv1(site(a)), exact under reduced-precision autocast too
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class Head(nn.Module):
    """``relu(bn)`` -> global average pool -> linear: works for any spatial size."""

    def __init__(self, planes: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)
        return self.linear(out)


def make_stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str = "act") -> nn.Sequential:
    """``blocks`` PreAct blocks; the first one carries the stride (and the projection if needed)."""
    layers = [PreActBlock(in_planes, planes, stride, shortcut)]
    layers += [PreActBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


__all__ = ["Head", "Normalize", "PreActBlock", "make_stage"]
