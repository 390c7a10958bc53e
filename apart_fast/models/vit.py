"""A small Vision Transformer for 32x32 images, with APART's sites in its pre-norm blocks.

Where the layer-wise perturbation goes in a transformer (the APART paper leaves it open): a pre-norm
block is two residual branches, ``x + attn(ln1(x))`` and ``x + mlp(ln2(x))``, each the counterpart of a
ResNet block. APART perturbs the activation a residual block feeds its first layer, so here the
*normalised input of each branch*: ``ln1(x)`` where it enters the attention's qkv projection and
``ln2(x)`` where it enters the MLP's first linear layer, two sites per block. The residual stream ``x``
is never perturbed: the branch reads the perturbed activation, the skip connection the clean one.
``site(h, layer)`` with the (biased) linear layer keeps the perturbation exact under 16-bit autocast.
The same rule is what ``attach_sites`` applies to torchvision's ``VisionTransformer`` from outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast.models.blocks import Normalize, _as_list
from apart_fast.models.sites import PerturbSite, full_precision


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + proj(attention(qkv(site(ln1(x)))))``, then ``x + fc2(gelu(fc1(site(ln2(x)))))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.site_attn = nn.LayerNorm(dim), PerturbSite()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln2, self.site_mlp = nn.LayerNorm(dim), PerturbSite()
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.site_attn(self.ln1(x), self.qkv).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        return x + self.fc2(F.gelu(self.site_mlp(self.ln2(x), self.fc1)))


class ViT(nn.Module):
    """Patch embedding (a ``patch`` x ``patch`` convolution, in fp32 under autocast like every stem), learned
    position embeddings, ``depth`` pre-norm blocks of ``width`` channels (2 sites each), mean-pooled tokens,
    LayerNorm, linear head. The defaults (patch 4, 6 blocks, width 128) train on a CPU for 32x32 images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch: int = 4,
                 width: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: int = 2,
                 mean: Sequence[float] | Tensor | None = None, std: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        for k, v in dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, patch=patch,
                         width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ViT: {k} must be a positive int, got {v!r}")
        if image_size % patch:
            raise ValueError(f"ViT: patch {patch} does not divide the image size {image_size}; pick a divisor of it")
        if width % heads:
            raise ValueError(f"ViT: width {width} is not a multiple of heads {heads}; pass --width a multiple of {heads}")
        self.config: dict[str, Any] = {
            "name": "vit",
            "kwargs": dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, patch=patch,
                           width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, mean=_as_list(mean), std=_as_list(std)),
        }
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, width))
        self.blocks = nn.Sequential(*[ViTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = full_precision(self.stem, self.normalize(x)).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(out)).mean(1))


__all__ = ["ViT", "ViTBlock"]
