"""The networks: PreAct ResNet-18 (the APART paper's model), WideResNet (WRN-34-10) and a small CPU model.

Every model starts with :class:`Normalize` (so it takes images in [0, 1]) and has one
``PerturbSite`` per residual block; the stem convolution runs in fp32 under autocast
(``full_precision``) so that the input perturbation reaches the network unrounded. Each model stores
``model.config = {"name": ..., "kwargs": {...}}`` (a plain dict) so that :func:`model_from_config` can rebuild it from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from apart_fast.models.blocks import Head, Normalize, _as_list, make_stage
from apart_fast.models.sites import full_precision
from apart_fast.models.vit import ViT
from apart_fast.models.zoo import PREFIX, torchvision_model

Stats = Sequence[float] | Tensor | None


def _check_positive(**values: int) -> None:
    """One-line ValueError for a non-positive size argument."""
    for k, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


class PreActResNet18(nn.Module):
    """PreAct ResNet-18: 3x3 stem, four stages of two PreAct blocks (``width * (1, 2, 4, 8)`` channels), 8 sites."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 64, mean: Stats = None, std: Stats = None,
        shortcut: str = "act",
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        self.config: dict[str, Any] = {
            "name": "preact18",
            "kwargs": dict(num_classes=num_classes, in_channels=in_channels, width=width, mean=_as_list(mean),
                           std=_as_list(std), shortcut=shortcut),
        }
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        w = width
        self.layer1 = make_stage(w, w, 2, 1, shortcut)
        self.layer2 = make_stage(w, 2 * w, 2, 2, shortcut)
        self.layer3 = make_stage(2 * w, 4 * w, 2, 2, shortcut)
        self.layer4 = make_stage(4 * w, 8 * w, 2, 2, shortcut)
        self.head = Head(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = full_precision(self.stem, self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.head(out)


class WideResNet(nn.Module):
    """Pre-activation WideResNet-``depth``-``widen``: stages of ``(depth-4)/6`` blocks, ``16*widen*(1,2,4)`` channels.

    One site per block (15 for WRN-34-10), on ``relu(bn1(x))`` feeding conv1; shortcuts unperturbed.
    """

    def __init__(
        self,
        depth: int = 34,
        widen: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Stats = None,
        std: Stats = None,
        shortcut: str = "act",
    ) -> None:
        super().__init__()
        _check_positive(depth=depth, widen=widen, num_classes=num_classes, in_channels=in_channels)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        name = "wrn34_10" if (depth, widen) == (34, 10) else "wideresnet"
        self.config: dict[str, Any] = {
            "name": name,
            "kwargs": dict(depth=depth, widen=widen, num_classes=num_classes, in_channels=in_channels,
                           mean=_as_list(mean), std=_as_list(std), shortcut=shortcut),
        }
        c = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, c[0], 3, stride=1, padding=1, bias=False)
        self.layer1 = make_stage(c[0], c[1], n, 1, shortcut)
        self.layer2 = make_stage(c[1], c[2], n, 2, shortcut)
        self.layer3 = make_stage(c[2], c[3], n, 2, shortcut)
        self.head = Head(c[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = full_precision(self.stem, self.normalize(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.head(out)


def wrn34_10(num_classes: int = 10, in_channels: int = 3, mean: Stats = None, std: Stats = None,
             shortcut: str = "act") -> WideResNet:
    """WRN-34-10, the usual large model of the adversarial-training literature (15 sites)."""
    return WideResNet(34, 10, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, shortcut=shortcut)


class SmallCNN(nn.Module):
    """A fast model for CPU runs (8x8 digits, 16x16/32x32 images): stem conv, two PreAct blocks (2 sites), head.

    The second block has stride 2 and a projection shortcut to ``2*width`` channels.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 16, mean: Stats = None, std: Stats = None,
        shortcut: str = "act",
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        self.config: dict[str, Any] = {
            "name": "smallcnn",
            "kwargs": dict(num_classes=num_classes, in_channels=in_channels, width=width, mean=_as_list(mean),
                           std=_as_list(std), shortcut=shortcut),
        }
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = make_stage(width, width, 1, 1, shortcut)
        self.layer2 = make_stage(width, 2 * width, 1, 2, shortcut)
        self.head = Head(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = full_precision(self.stem, self.normalize(x))
        return self.head(self.layer2(self.layer1(out)))


MODEL_NAMES = ("preact18", "wrn34_10", "smallcnn", "vit")


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    width: int | None = None,
    mean: Stats = None,
    std: Stats = None,
    shortcut: str = "act",
    image_size: int | None = None,
    stem: str = "native",
) -> nn.Module:
    """Build a model by name (``preact18``, ``wrn34_10``, ``smallcnn``, ``vit``, ``torchvision:NAME``).

    ``width`` is the base width for ``preact18`` (default 64) and ``smallcnn`` (default 16), the
    widening factor for ``wrn34_10`` (default 10) and the token width for ``vit`` (default 128).
    ``shortcut``: the projection shortcut's input, ``act`` (relu(bn1(x)), the common PreAct block) or
    ``raw`` (x, the APART script's block). ``image_size`` (the side of the square images) sizes a ViT's
    position embedding; ``stem`` adapts a torchvision model (``zoo.py``). ``model.config`` records how to
    rebuild it.
    """
    if name.startswith(PREFIX):
        if width is not None:
            raise ValueError(f"--width {width} does not apply to {name} (torchvision's widths are fixed); drop --width")
        return torchvision_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                 stem=stem, mean=_as_list(mean), std=_as_list(std))
    if stem != "native":
        raise ValueError(f"--stem {stem} adapts torchvision: models; {name} has a stem for small images already, drop --stem")
    if name == "vit":
        side = 32 if image_size is None else image_size
        return ViT(num_classes, in_channels, side, width=128 if width is None else width, mean=mean, std=std)
    kw: dict[str, Any] = dict(mean=mean, std=std, shortcut=shortcut)
    if name == "preact18":
        return PreActResNet18(num_classes, in_channels, 64 if width is None else width, **kw)
    if name == "wrn34_10":
        return WideResNet(34, 10 if width is None else width, num_classes, in_channels, **kw)
    if name == "smallcnn":
        return SmallCNN(num_classes, in_channels, 16 if width is None else width, **kw)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}, {PREFIX}NAME (e.g. {PREFIX}resnet18)")


_CLASSES: dict[str, type[nn.Module]] = {
    "preact18": PreActResNet18,
    "wrn34_10": WideResNet,
    "wideresnet": WideResNet,
    "smallcnn": SmallCNN,
    "vit": ViT,
}


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model (fresh weights) from ``model.config``, e.g. before loading a checkpoint's state_dict."""
    try:
        name, kwargs = config["name"], config["kwargs"]
    except (KeyError, TypeError):
        raise ValueError(f"model config must be a dict with 'name' and 'kwargs', got {config!r}") from None
    if isinstance(name, str) and name.startswith(PREFIX):
        return torchvision_model(name, **kwargs)
    if name not in _CLASSES:
        raise ValueError(f"unknown model {name!r} in config; valid names: {', '.join(_CLASSES)}, {PREFIX}NAME")
    return _CLASSES[name](**kwargs)


__all__ = [
    "MODEL_NAMES",
    "PreActResNet18",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "model_from_config",
    "wrn34_10",
]
