"""Memory of the per-block pass-1 gradients APART keeps for pass 2: fp32 gradients vs int8 signs.

``python benchmarks/sign_storage.py`` prints it for PreAct ResNet-18 (width 64), batch 128, 32x32 inputs.
Shapes come from one forward pass on the meta device (no memory, no compute) with a hook on every
perturbation site, checked against the shapes worked out by hand.
"""

from __future__ import annotations

import torch
from torch import nn


def site_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the activations entering each PerturbSite of ``model`` for an input of ``input_shape``."""
    from apart_fast.models.sites import find_sites

    shapes: list[tuple[int, ...]] = []
    hooks = [s.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape))) for s in find_sites(model)]
    try:
        with torch.no_grad():
            model.to("meta")(torch.empty(input_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def preact18_shapes_analytic(batch: int = 128, width: int = 64, size: int = 32) -> list[tuple[int, ...]]:
    """Site shapes of PreAct ResNet-18 by hand: a block's first conv sees the previous stage's channels/resolution."""
    shapes, in_ch, res = [], width, size
    for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            shapes.append((batch, in_ch, res, res))  # input of the block (before its stride-2 conv)
            if block == 0 and stage > 0:
                res //= 2
            in_ch = planes
    return shapes


def sign_storage_bytes(shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Bytes of the kept pass-1 gradients: fp32 (4 bytes/element) vs int8 signs (1 byte/element)."""
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    return {"elements": n, "fp32_bytes": 4 * n, "int8_bytes": n}


def main() -> None:
    """Print the per-site shapes and the fp32 vs int8 storage of PreAct ResNet-18's pass-1 gradients."""
    batch = 128
    from apart_fast.models import build_model

    shapes = site_shapes(build_model("preact18", num_classes=10, in_channels=3), (batch, 3, 32, 32))
    assert shapes == preact18_shapes_analytic(batch), (shapes, preact18_shapes_analytic(batch))
    r = sign_storage_bytes(shapes)
    print(f"PreAct ResNet-18 (width 64), batch {batch}, 32x32 inputs, {len(shapes)} sites, shapes measured on the meta device:")
    for s in shapes:
        print(f"  {s}: {torch.Size(s).numel() / 1e6:.3f} M elements")
    mib = 2**20
    print(f"total {r['elements'] / 1e6:.3f} M elements: fp32 {r['fp32_bytes'] / mib:.1f} MiB vs int8 signs "
          f"{r['int8_bytes'] / mib:.1f} MiB (saves {(r['fp32_bytes'] - r['int8_bytes']) / mib:.1f} MiB; "
          f"plus the input gradient: fp32 {4 * batch * 3 * 32 * 32 / mib:.2f} MiB)")


if __name__ == "__main__":
    main()
