"""How much of APART's perturbations survives bf16 autocast on the CPU, before and after the fix (README).

    python benchmarks/perturbation_precision.py

Input: ``x + d`` with ``x`` uniform in [0,1] and ``d = a * sign``; the stem convolution's output shift under
autocast (plain: the convolution casts ``x + d`` to bf16; fixed: ``full_precision``) against fp32's.
Layer: a PreAct block's first convolution, input ``relu(bn1(h)) + a * sign`` (plain: added in bf16 and cast;
fixed: ``site(h, conv1)``). Survival = relative L2 error of the shift (0 = all of it, 1 = none of it kept).
"""

from __future__ import annotations

import torch

from apart_fast.models import PreActBlock, SmallCNN, applying
from apart_fast.models.sites import full_precision


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    torch.manual_seed(0)
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16)
    net = SmallCNN(num_classes=10, in_channels=3, width=16).eval()
    x = torch.rand(32, 3, 32, 32)
    sign = torch.randint(-1, 2, x.shape).float()
    print("| perturbation | size a | error, plain bf16 | error, fixed |\n|---|---|---|---|")
    with torch.no_grad():
        for a in (1e-4, 1e-3, 2 / 255, 8 / 255):
            want = net.stem(x + a * sign) - net.stem(x)
            with torch.autocast(**bf16):
                plain = net.stem(x + a * sign).float() - net.stem(x).float()
                fixed = full_precision(net.stem, x + a * sign) - full_precision(net.stem, x)
            print(f"| input (stem conv) | {a:.4g} | {error(plain, want):.3f} | {error(fixed, want):.2g} |")
        blk = PreActBlock(64, 64).eval()
        h = torch.randn(32, 64, 16, 16)
        s8 = torch.randint(-1, 2, h.shape, dtype=torch.int8)
        act = torch.relu(blk.bn1(h))
        for a in (1e-4, 1e-3, 4e-3, 1.6e-2):
            alpha = torch.tensor(a)
            want = blk.conv1(act + alpha * s8.float()) - blk.conv1(act)
            with torch.autocast(**bf16):
                clean = blk.conv1(act).float()
                with applying([blk.site], [s8], [alpha], backend="torch"):
                    plain = blk.conv1(blk.site(act)).float() - clean
                    fixed = blk.site(act, blk.conv1).float() - clean
            print(f"| layer (block conv1) | {a:.4g} | {error(plain, want):.3f} | {error(fixed, want):.3f} |")


if __name__ == "__main__":
    main()
