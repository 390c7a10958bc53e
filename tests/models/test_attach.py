"""Sites attached from outside (``models/attach.py``) and the project's own sites, one case per family:
the perturbation reaches only its branch (the shortcut / residual stream is bit-identical with and
without it), pass 1 records dL/dh along the site's path only, and dL/da equals a finite difference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from apart_fast.models import PreActBlock, applying, attach_sites, find_sites, recording, site_names
from apart_fast.models.attach import AttachedSite
from apart_fast.models.vit import ViTBlock


def _bn_random(block: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affines (eval: a fixed affine map that is not the identity), float64."""
    g = torch.Generator().manual_seed(1)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return block.double().eval()


def _capture(module: nn.Module, into: dict, key: str, first: bool = False):
    """Forward hook keeping a copy of ``module``'s output (its first element when a tuple)."""
    def hook(m, args, out):
        into[key] = (out[0] if first else out).detach().clone()
    return module.register_forward_hook(hook)


# Each family: (block, input, where its residual stream is rebuilt from captured parts).
def basic(stride: int):
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride, bias=False), nn.BatchNorm2d(16)) if stride != 1 else None
    block = BasicBlock(8, 16 if down is not None else 8, stride, downsample=down)
    return block, torch.randn(3, 8, 6, 6, dtype=torch.float64)


def bottleneck():
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return Bottleneck(8, 4, 2, downsample=down), torch.randn(3, 8, 6, 6, dtype=torch.float64)


def encoder():
    return EncoderBlock(2, 16, 24, 0.0, 0.0), torch.randn(3, 5, 16, dtype=torch.float64)


def preact(stride: int):
    return PreActBlock(8, 16 if stride != 1 else 8, stride), torch.randn(3, 8, 6, 6, dtype=torch.float64)


def project_vit():
    return ViTBlock(16, 2, 2), torch.randn(3, 5, 16, dtype=torch.float64)


FAMILIES = {"basic": lambda: basic(1), "basic_down": lambda: basic(2), "bottleneck": bottleneck, "encoder": encoder,
            "preact": lambda: preact(1), "preact_proj": lambda: preact(2), "vit": project_vit}
N_SITES = {"basic": 1, "basic_down": 1, "bottleneck": 1, "encoder": 2, "preact": 1, "preact_proj": 1, "vit": 2}


def build(family: str):
    torch.manual_seed(0)
    block, x = FAMILIES[family]()
    names = attach_sites(block)
    return _bn_random(block), x, names


def stream(family: str, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The block's output, its captured parts, and the output rebuilt from them with the clean shortcut /
    residual input: equal bit for bit when the perturbation reached the branch only."""
    parts: dict = {}
    hooks = []
    if family in ("basic", "basic_down", "bottleneck"):
        last = block.bn3 if family == "bottleneck" else block.bn2
        hooks.append(_capture(last, parts, "branch"))  # before ``out += identity`` changes it in place
        if block.downsample is not None:
            hooks.append(_capture(block.downsample, parts, "skip"))
    elif family == "encoder":
        hooks += [_capture(block.self_attention, parts, "attn", first=True), _capture(block.mlp, parts, "mlp")]
    elif family.startswith("preact"):
        hooks.append(_capture(block.conv2, parts, "branch"))
        if block.shortcut is not None:
            hooks.append(_capture(block.shortcut, parts, "skip"))
    else:
        hooks += [_capture(block.proj, parts, "attn"), _capture(block.fc2, parts, "mlp")]
    out = block(x)
    for h in hooks:
        h.remove()
    if family in ("basic", "basic_down", "bottleneck"):
        rebuilt = torch.relu(parts["branch"] + parts.get("skip", x))
    elif family in ("encoder", "vit"):
        rebuilt = (parts["attn"] + x) + parts["mlp"]
    else:
        rebuilt = parts["branch"] + parts.get("skip", x)
    return out, parts, rebuilt


def signs_for(block: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A random sign tensor (int8) of each site's activation shape."""
    sites = find_sites(block)
    with recording(sites):
        block(x)
        shapes = [s.recorded.shape for s in sites]
    g = torch.Generator().manual_seed(2)
    return [torch.randint(-1, 2, sh, generator=g, dtype=torch.int8) for sh in shapes]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_finds_every_family(family):
    block, _, names = build(family)
    assert len(find_sites(block)) == N_SITES[family] == len(names)
    attached = family in ("basic", "basic_down", "bottleneck", "encoder")
    assert all(isinstance(s, AttachedSite) == attached for s in find_sites(block))
    if family == "encoder":
        assert names == ["self_attention", "mlp.0"]
    elif attached:
        assert names == ["conv1"]
    assert set(block.state_dict()) == set(FAMILIES[family]()[0].state_dict())  # no new keys
    assert attach_sites(block) == names and len(find_sites(block)) == N_SITES[family]  # idempotent


@pytest.mark.parametrize("family", list(FAMILIES))
def test_perturbation_reaches_only_the_branch(family):
    block, x, _ = build(family)
    sites, signs = find_sites(block), signs_for(block, x)
    x_before = x.clone()
    clean, clean_parts, _ = stream(family, block, x)
    alphas = [torch.tensor(0.05, dtype=torch.float64) for _ in sites]
    with applying(sites, signs, alphas, backend="torch"):
        out, parts, rebuilt = stream(family, block, x)
    assert torch.equal(x, x_before)  # nothing perturbed in place
    assert torch.equal(out, rebuilt)  # the output is the branch plus the clean input (or its projection)
    if "skip" in parts:
        assert torch.equal(parts["skip"], clean_parts["skip"])  # the projection shortcut read the clean activation
    assert not torch.allclose(out, clean)  # and the perturbation did change the branch


def _loss(block: nn.Module, x: torch.Tensor, w: torch.Tensor, sites, signs, alphas) -> torch.Tensor:
    with applying(sites, signs, alphas, backend="torch"):
        return (block(x) * w).sum()


def _value(block: nn.Module, x: torch.Tensor, w: torch.Tensor, sites, signs, alphas) -> float:
    with torch.no_grad():
        return float(_loss(block, x, w, sites, signs, alphas))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_site_gradients_match_finite_differences(family):
    block, x, _ = build(family)
    sites, signs = find_sites(block), signs_for(block, x)
    w = torch.randn(block(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # pass 1: dL/dh recorded at each site, along the site's own path
    with recording(sites):
        loss = (block(x.clone().requires_grad_(True)) * w).sum()  # as in pass 1, whose input requires grad
        hs = [s.recorded for s in sites]
    recorded = torch.autograd.grad(loss, hs)
    delta = 1e-6
    for i in range(len(sites)):
        def at(v: float, i=i) -> float:
            alphas = [torch.tensor(v if j == i else 0.0, dtype=torch.float64) for j in range(len(sites))]
            return _value(block, x, w, sites, signs, alphas)
        fd0 = (at(delta) - at(-delta)) / (2 * delta)
        assert float((recorded[i] * signs[i]).sum()) == pytest.approx(fd0, rel=1e-6, abs=1e-8)
    # pass 2: dL/da at a nonzero step size, every site at once
    base = torch.tensor([0.03 * (k + 1) for k in range(len(sites))], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_loss(block, x, w, sites, signs, list(base)), base)
    for i in range(len(sites)):
        step = torch.zeros_like(base)
        step[i] = delta
        plus = _value(block, x, w, sites, signs, list((base + step).detach()))
        minus = _value(block, x, w, sites, signs, list((base - step).detach()))
        assert float(grad[i]) == pytest.approx((plus - minus) / (2 * delta), rel=1e-6, abs=1e-8)


def test_recorded_gradient_leaves_out_the_shortcut():
    """The recorded dL/dh of a BasicBlock with an identity shortcut is the conv1 path's alone: the whole input
    gradient (conv1 path plus identity) differs from it by exactly the identity path's gradient."""
    block, x, _ = build("basic")
    w = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    (site,) = find_sites(block)
    xl = x.clone().requires_grad_(True)
    with recording([site]):
        out = block(xl)
        h = site.recorded
    g_site, g_x = torch.autograd.grad((out * w).sum(), [h, xl])
    pre = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + x
    g_skip = w * (pre > 0)  # d/dx of relu(branch + x) through the identity only
    torch.testing.assert_close(g_x, g_site + g_skip, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(g_site, g_x)


def test_sites_by_name_and_errors():
    block = _bn_random(BasicBlock(8, 8))
    assert attach_sites(block, "conv2") == ["conv2"]
    assert attach_sites(block, ["conv1", "conv2"]) == ["conv1", "conv2"]  # module order; conv2 kept, not doubled
    assert len(find_sites(block)) == 2
    with pytest.raises(ValueError, match=r"no module 'conv3' \(close: conv2, conv1\); pass names from model.named_modules\(\)"):
        attach_sites(block, "conv3")
    with pytest.raises(ValueError, match="already marks 1 PerturbSite"):
        attach_sites(PreActBlock(4, 4), "conv1")
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError) as err:
        attach_sites(plain)
    msg = str(err.value)
    assert "\n" not in msg and "Sequential (it holds Conv2d x2, ReLU x1, Flatten x1, Linear x1)" in msg
    assert "attach_sites(model, ['2', '4']) or --apart-sites 2,4" in msg and "--no-apart-layer-perturb" in msg


def test_deep_copy_keeps_sites_on_its_own_layers():
    import copy

    block, x, _ = build("basic")
    twin = copy.deepcopy(block)
    (site,), (twin_site,) = find_sites(block), find_sites(twin)
    with recording([twin_site]):
        twin(x)
    assert twin_site.recorded is not None and site.recorded is None
    assert site_names(twin) == ["conv1"]


@pytest.mark.parametrize("family", ["basic", "encoder"])
def test_hooked_perturbation_survives_bf16(family):
    """Under bf16 autocast a hooked site keeps the perturbation: after a linear layer (conv1, the MLP's first
    linear) the effect ``alpha * layer(sign)`` is added in fp32 to the layer's bf16 output, within 3% of fp32's
    effect (a plain bf16 addition loses most of a 2e-3 step); an attention is rerun in fp32 on the perturbed
    input, so its output is fp32's perturbed output."""
    block, x, _ = build(family)
    block, x = block.float(), x.float()
    sites, signs = find_sites(block), signs_for(block, x)
    alphas = [torch.tensor(2e-3) for _ in sites]
    layers = [block.conv1] if family == "basic" else [block.self_attention, block.mlp[0]]

    def outputs(amp: bool, armed: int | None, plain: bool = False) -> list[torch.Tensor]:
        """Each site layer's output, with site ``armed`` alone applying (None: none)."""
        seen: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)
                                                                            .detach().float())) for layer in layers]
        if plain:  # the perturbation added to conv1's input in the input's own precision (bf16)
            hooks.append(block.conv1.register_forward_pre_hook(
                lambda m, a: (a[0] + (alphas[0] * signs[0]).to(torch.bfloat16),)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if armed is None or plain:
                block(x)
            else:
                with applying([sites[armed]], [signs[armed]], [alphas[armed]], backend="torch"):
                    block(x)
        for h in hooks:
            h.remove()
        return seen

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    clean32, clean16 = outputs(False, None), outputs(True, None)
    for k, layer in enumerate(layers):  # one site at a time: an fp32 attention upstream rounds differently
        want = outputs(False, k)[k] - clean32[k]
        if isinstance(layer, nn.MultiheadAttention):
            assert rel(outputs(True, k)[k] - clean32[k], want) < 0.03  # rerun in fp32: fp32's perturbed output
        else:
            assert rel(outputs(True, k)[k] - clean16[k], want) < 0.03
    if family == "basic":
        plain16 = outputs(True, 0, plain=True)
        assert rel(plain16[0] - clean16[0], outputs(False, 0)[0] - clean32[0]) > 0.3
