"""Under bf16 autocast the network sees APART's perturbations as fp32 does (sites.py, "Reduced precision").

Tolerance: the perturbation's effect on the first convolution's output, and dL/da of the step sizes, are
within 3% (relative L2) of fp32's, where a plain bf16 addition loses most of it (checked too, so the
comparison can fail)."""

from __future__ import annotations

import torch

from apart_fast.models import PerturbSite, PreActBlock, SmallCNN, applying, recording
from apart_fast.models.sites import full_precision

TOL = 0.03
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def block_case(alpha_value: float = 1e-3):
    torch.manual_seed(0)
    blk = PreActBlock(16, 16).eval()  # eval: BatchNorm is a fixed affine map, the same in both runs
    x = torch.randn(4, 16, 8, 8)
    sign = torch.randint(-1, 2, (4, 16, 8, 8), dtype=torch.int8)
    alpha = torch.tensor(alpha_value, requires_grad=True)
    w = torch.randn(4, 16, 8, 8)
    return blk, x, sign, alpha, w


def first_conv_shift(blk: PreActBlock, x, sign, alpha, amp: bool, exact: bool = True):
    """conv1's output with the site applied minus without, and dL/dalpha for L = sum(w * that output)."""
    a = torch.relu(blk.bn1(x))
    with torch.autocast(**BF16, enabled=amp):
        clean = blk.conv1(a)
        with applying([blk.site], [sign], [alpha], backend="torch"):
            pert = blk.site(a, blk.conv1) if exact else blk.conv1(blk.site(a))
    return pert.float() - clean.float(), pert


def test_site_perturbation_survives_bf16():
    blk, x, sign, alpha, w = block_case()
    shift32, out32 = first_conv_shift(blk, x, sign, alpha, amp=False)
    (g32,) = torch.autograd.grad((out32 * w).sum(), alpha)
    shift16, out16 = first_conv_shift(blk, x, sign, alpha, amp=True)
    (g16,) = torch.autograd.grad((out16.float() * w).sum(), alpha)
    assert rel(shift16, shift32) < TOL
    assert abs(float(g16 - g32)) < TOL * abs(float(g32))
    naive, _ = first_conv_shift(blk, x, sign, alpha, amp=True, exact=False)
    assert rel(naive, shift32) > 0.5  # a plain bf16 h + a*s loses most of a 1e-3 perturbation


def test_input_perturbation_survives_bf16():
    torch.manual_seed(0)
    net = SmallCNN(num_classes=10, in_channels=3, width=8).eval()
    x = torch.rand(4, 3, 16, 16)
    d = (2 / 255) * torch.randint(-1, 2, x.shape).float()
    want = net.stem(x + d) - net.stem(x)
    with torch.autocast(**BF16):
        got = full_precision(net.stem, x + d) - full_precision(net.stem, x)
        naive = net.stem(x + d).float() - net.stem(x).float()
    assert rel(got, want) < 1e-6
    assert rel(naive, want) > 0.1


def test_whole_network_step_size_gradients_match_fp32():
    """dL/da for every site of a SmallCNN (signs from a recording pass, as APART's pass 1 takes them) under
    bf16 autocast is fp32's within the tolerance."""
    torch.manual_seed(0)
    net = SmallCNN(num_classes=10, in_channels=3, width=16).eval()
    sites = [m for m in net.modules() if isinstance(m, PerturbSite)]
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    with recording(sites):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        hs = [s.recorded for s in sites]
    signs = [torch.sign(g).to(torch.int8) for g in torch.autograd.grad(loss, hs)]
    grads = []
    for amp in (False, True):
        alphas = [torch.tensor(2e-3, requires_grad=True) for _ in sites]
        with applying(sites, signs, alphas, backend="torch"), torch.autocast(**BF16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        grads.append(torch.stack(torch.autograd.grad(loss, alphas)))
    assert rel(grads[1], grads[0]) < TOL
