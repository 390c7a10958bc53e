"""torchvision's classification models by name (``torchvision:resnet18``), for 32x32 images if asked.

``torchvision_model`` builds any constructor of ``torchvision.models.list_models(module=torchvision.models)``
with ``num_classes`` from the data, and records how in ``model.config`` so that ``load_model`` rebuilds
it from a checkpoint. ``stem="cifar"`` is the usual CIFAR adaptation: for the ResNet family (ResNet,
ResNeXt, Wide ResNet) a 3x3 stride-1 convolution replaces the 7x7 stride-2 one and the max-pool goes;
for ``VisionTransformer`` the patch size becomes 4 (a 64-token sequence at 32x32). Either family also
takes images of other channel counts (a new stem). The stem runs in fp32 under autocast, as in the
project's models, so that the input perturbation is not rounded away. The model keeps torchvision's
module names (and state_dict keys); APART's sites are attached by the method (``attach.py``).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import Tensor, nn

from apart_fast.models.blocks import Normalize, _as_list
from apart_fast.models.sites import reduced_autocast

PREFIX = "torchvision:"
CIFAR_PATCH = 4


class FullPrecisionConv2d(nn.Conv2d):
    """A convolution that runs in fp32 under 16-bit autocast (a stem: the input perturbation is a few bf16 steps)."""

    def forward(self, x: Tensor) -> Tensor:
        if not reduced_autocast(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class Normalized(nn.Module):
    """``net(normalize(x))``: a torchvision model taking images in [0, 1] with per-channel normalisation inside."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize, self.net = Normalize(mean, std), net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def torchvision_names() -> list[str]:
    """The classification constructors of the installed torchvision."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _arch(name: str) -> str:
    """``resnet18`` of ``torchvision:resnet18``; ValueError naming the valid names otherwise."""
    arch = name.removeprefix(PREFIX)
    names = torchvision_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3) or ["resnet18", "resnet50", "vit_b_16"]
        raise ValueError(f"unknown torchvision model {arch!r}; pass --model torchvision:NAME with a classification model of "
                         f"torchvision.models.list_models(module=torchvision.models), e.g. {', '.join(close)}")
    return arch


def _stem_conv(cin: int, cout: int, kernel: int, stride: int, padding: int, bias: bool) -> FullPrecisionConv2d:
    return FullPrecisionConv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)


def torchvision_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int | None = None,
                      stem: str = "native", mean: list[float] | None = None, std: list[float] | None = None) -> nn.Module:
    """torchvision's ``name`` (``torchvision:ARCH``) with fresh weights for ``num_classes`` classes; ``stem`` and the
    channels adapt it (module docstring). ``image_size`` is required by ViTs (their position embedding)."""
    import torchvision
    from torchvision.models import ResNet, VisionTransformer

    arch = _arch(name)
    builder = torchvision.models.get_model_builder(arch)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    vit = arch.startswith("vit_")
    if vit:
        if image_size is None:
            raise ValueError(f"torchvision:{arch} needs the image size (its position embedding); pass image_size")
        if stem == "native":
            kwargs["image_size"] = image_size
    try:
        net = builder(**kwargs)
    except (AssertionError, RuntimeError, ValueError) as err:  # torch._assert: image size not a multiple of the patch
        raise ValueError(f"torchvision:{arch} cannot be built for {image_size}px images ({' '.join(str(err).split())}); "
                         "use --stem cifar (patch 4) or another model") from None
    if isinstance(net, ResNet):
        if stem == "cifar":
            net.conv1, net.maxpool = _stem_conv(in_channels, net.conv1.out_channels, 3, 1, 1, False), nn.Identity()
        else:
            net.conv1 = _stem_conv(in_channels, net.conv1.out_channels, 7, 2, 3, False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    elif isinstance(net, VisionTransformer):
        patch = CIFAR_PATCH if stem == "cifar" else net.patch_size
        if image_size % patch:
            raise ValueError(f"torchvision:{arch}: patch {patch} does not divide the image size {image_size}")
        net.conv_proj = _stem_conv(in_channels, net.hidden_dim, patch, patch, 0, True)
        fan_in = in_channels * patch * patch  # torchvision's init of conv_proj
        nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(net.conv_proj.bias)
        if stem == "cifar":
            net.patch_size, net.image_size = patch, image_size
            net.seq_length = (image_size // patch) ** 2 + 1
            net.encoder.pos_embedding = nn.Parameter(torch.empty(1, net.seq_length, net.hidden_dim).normal_(std=0.02))
    elif stem != "native" or in_channels != 3:
        raise ValueError(f"torchvision:{arch} keeps its own stem: --stem cifar and {in_channels}-channel images are "
                         "supported for the ResNet family and ViTs; use --stem native with 3-channel data, or such a model")
    model: nn.Module = Normalized(net, mean, std) if mean is not None else net
    model.config = {"name": f"{PREFIX}{arch}",
                    "kwargs": dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, stem=stem,
                                   mean=_as_list(mean), std=_as_list(std))}
    return model


__all__ = ["PREFIX", "FullPrecisionConv2d", "Normalized", "torchvision_model", "torchvision_names"]
