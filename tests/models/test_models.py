"""Models: shapes, site placement (record/apply), unperturbed shortcuts, Normalize, build_model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apart_fast.models import (
    Normalize,
    PerturbSite,
    PreActBlock,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    applying,
    build_model,
    find_sites,
    model_from_config,
    recording,
    wrn34_10,
)


def _blocks(model: torch.nn.Module) -> list[PreActBlock]:
    return [m for m in model.modules() if isinstance(m, PreActBlock)]


def _seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics/affines so BN is not the identity in eval mode (makes the checks meaningful)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("size", [32, 16])
def test_preact18_shapes(size: int) -> None:
    m = PreActResNet18(num_classes=7, in_channels=3, width=8)
    assert m(torch.rand(2, 3, size, size)).shape == (2, 7)


def test_preact18_grayscale_8x8() -> None:
    m = build_model("preact18", num_classes=10, in_channels=1, width=4)
    assert m(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 3)])
def test_smallcnn_shapes(size: int, channels: int) -> None:
    m = SmallCNN(num_classes=10, in_channels=channels)
    assert m(torch.rand(4, channels, size, size)).shape == (4, 10)
    assert len(find_sites(m)) == 2


@pytest.mark.slow
def test_wrn34_10_shape_and_sites() -> None:
    m = wrn34_10(num_classes=10).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    assert len(find_sites(m)) == 15
    assert m.config["name"] == "wrn34_10"


def test_site_counts() -> None:
    assert len(find_sites(PreActResNet18(width=4))) == 8
    assert len(find_sites(WideResNet(depth=34, widen=1))) == 15
    assert len(find_sites(WideResNet(depth=16, widen=1))) == 6
    m = WideResNet(depth=16, widen=2, num_classes=5)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_wideresnet_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=20, widen=1)


@pytest.mark.parametrize(
    "make",
    [lambda: PreActResNet18(width=4), lambda: WideResNet(depth=10, widen=2), lambda: SmallCNN(10, 3, width=8)],
)
def test_record_holds_relu_bn1_of_block_input(make) -> None:
    model = _seeded(make())
    blocks = _blocks(model)
    inputs: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0])) for i, b in
               enumerate(blocks)]
    sites = find_sites(model)
    assert sites == [b.site for b in blocks]
    x = torch.rand(2, 3, 16, 16)
    with recording(sites):
        model(x)
        recorded = [s.recorded for s in sites]
    for h in handles:
        h.remove()
    assert all(s.mode == "off" for s in sites)
    for i, b in enumerate(blocks):
        expected = F.relu(b.bn1(inputs[i]))
        torch.testing.assert_close(recorded[i], expected, rtol=0, atol=0)


def test_recorded_site_gives_gradient() -> None:
    model = _seeded(PreActResNet18(width=4))
    sites = find_sites(model)
    with recording(sites):
        loss = model(torch.rand(2, 3, 16, 16)).sum()
        recorded = [s.recorded for s in sites]
        grads = torch.autograd.grad(loss, recorded)
    assert [g.shape for g in grads] == [r.shape for r in recorded]
    assert all(g.abs().sum() > 0 for g in grads)


def test_recorded_gradient_is_the_site_path_not_the_shortcut() -> None:
    """dL/dh of a recorded site is what a perturbation at the site sees (through conv1 only), also where
    the projection shortcut reads the same ``relu(bn1(x))``: the same in eager and compiled models."""
    torch.manual_seed(0)
    block = PreActBlock(4, 8, stride=2)
    assert block.shortcut is not None
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)
    with recording([block.site]):
        loss = (block(x) * w).sum()
        (got,) = torch.autograd.grad(loss, [block.site.recorded])
    a = F.relu(block.bn1(x))
    delta = torch.zeros_like(a, requires_grad=True)
    out = block.conv2(F.relu(block.bn2(block.conv1(a + delta)))) + block.shortcut(a)
    (expected,) = torch.autograd.grad((out * w).sum(), [delta])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    through_both = torch.autograd.grad(((block.conv2(F.relu(block.bn2(block.conv1(a)))) + block.shortcut(a)) * w).sum(), [a])[0]
    assert not torch.allclose(got, through_both, atol=1e-4)


def _signs_for(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    sites = find_sites(model)
    with recording(sites):
        model(x)
        shapes = [s.recorded.shape for s in sites]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(-1, 2, s, generator=g).to(torch.int8) for s in shapes]


def test_apply_alpha_zero_is_identity_and_nonzero_changes() -> None:
    model = _seeded(PreActResNet18(width=4))
    x = torch.rand(2, 3, 16, 16)
    sites = find_sites(model)
    signs = _signs_for(model, x)
    with torch.no_grad():
        base = model(x)
        with applying(sites, signs, [torch.tensor(0.0)] * len(sites)):
            zero = model(x)
        with applying(sites, signs, [torch.tensor(0.3)] * len(sites)):
            moved = model(x)
        after = model(x)
    torch.testing.assert_close(zero, base, rtol=0, atol=0)
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(after, base, rtol=0, atol=0)
    assert all(s.mode == "off" and s.sign is None for s in sites)


def test_apply_alpha_gradient_flows() -> None:
    model = _seeded(SmallCNN(10, 3, width=8))
    x = torch.rand(2, 3, 8, 8)
    sites = find_sites(model)
    signs = _signs_for(model, x)
    alphas = [torch.tensor(0.0, requires_grad=True) for _ in sites]
    with applying(sites, signs, alphas):
        loss = model(x).logsumexp(1).sum()
    grads = torch.autograd.grad(loss, alphas)
    assert all(g.abs() > 0 for g in grads)


def test_shortcut_takes_unperturbed_input() -> None:
    model = _seeded(PreActResNet18(width=4))
    block = model.layer2[0]
    assert block.shortcut is not None
    seen: dict[str, torch.Tensor] = {}
    h1 = block.shortcut.register_forward_hook(lambda m, a, out: seen.__setitem__("short", out))
    h2 = block.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv1_in", a[0]))
    x = torch.rand(2, 3, 16, 16)
    sites = find_sites(model)
    k = sites.index(block.site)
    signs = _signs_for(model, x)
    alphas = [torch.tensor(0.0)] * len(sites)
    alphas[k] = torch.tensor(0.5)
    with torch.no_grad():
        model(x)
        short0, conv0 = seen["short"], seen["conv1_in"]
        with applying(sites, signs, alphas):
            model(x)
        short1, conv1 = seen["short"], seen["conv1_in"]
    h1.remove()
    h2.remove()
    torch.testing.assert_close(short1, short0, rtol=0, atol=0)
    torch.testing.assert_close(conv1 - conv0, 0.5 * signs[k].float(), rtol=0, atol=1e-6)


def test_identity_shortcut_is_block_input() -> None:
    model = _seeded(SmallCNN(10, 3, width=4))
    block = model.layer1[0]
    assert block.shortcut is None
    x = torch.rand(2, 3, 8, 8)
    sites = find_sites(model)
    signs = _signs_for(model, x)
    captured: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda m, a: captured.__setitem__("in", a[0]))
    block.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))
    with torch.no_grad(), applying(sites, signs, [torch.tensor(0.7)] * len(sites)):
        model(x)
        a = F.relu(block.bn1(captured["in"]))
        path = block.conv2(F.relu(block.bn2(block.conv1(a + 0.7 * signs[0].float()))))
    torch.testing.assert_close(captured["out"], path + captured["in"], rtol=1e-5, atol=1e-5)


def test_normalize_module() -> None:
    n = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(n(x), expected)
    assert "normalize.mean" not in dict(PreActResNet18(width=4).state_dict())
    ident = Normalize()
    assert ident(x) is x
    with pytest.raises(ValueError):
        Normalize([0.5], None)
    with pytest.raises(ValueError):
        Normalize([0.5], [0.0])


def test_normalize_applied_inside_model() -> None:
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    a = _seeded(SmallCNN(10, 3, width=8, mean=mean, std=std))
    b = SmallCNN(10, 3, width=8).eval()
    missing = b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("normalize.")})
    assert not missing.missing_keys and not missing.unexpected_keys
    assert "normalize.mean" in a.state_dict()
    x = torch.rand(2, 3, 8, 8)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(xn), rtol=1e-5, atol=1e-5)
    assert isinstance(next(iter(a.children())), Normalize)


def test_build_model_names_and_config_roundtrip() -> None:
    for name, kw in [("preact18", {"width": 4}), ("smallcnn", {"width": 4, "mean": [0.5], "std": [0.5]})]:
        m = build_model(name, num_classes=3, in_channels=1, **kw)
        assert m.config["name"] == name
        assert m.config["kwargs"]["num_classes"] == 3
        r = model_from_config(m.config)
        assert type(r) is type(m)
        assert {k: v.shape for k, v in r.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
        r.load_state_dict(m.state_dict())
    small = WideResNet(depth=10, widen=1)
    assert small.config["name"] == "wideresnet"
    assert type(model_from_config(small.config)) is WideResNet


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError) as e:
        build_model("resnet50", num_classes=10, in_channels=3)
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("preact18", "wrn34_10", "smallcnn"):
        assert name in msg
    with pytest.raises(ValueError):
        model_from_config({"name": "nope", "kwargs": {}})


def test_perturb_site_is_marker_for_user_models() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), PerturbSite(), torch.nn.ReLU(), PerturbSite())
    assert len(find_sites(model)) == 2


def test_raw_shortcut_differs_from_act_only_at_projections() -> None:
    """Same weights: identity-shortcut blocks give the same output, projection blocks differ, and the raw
    variant's projection reads the block input ``x`` (the APART script's block) where act reads relu(bn1(x))."""
    act = _seeded(SmallCNN(10, 3, width=4, shortcut="act"))
    raw = SmallCNN(10, 3, width=4, shortcut="raw").eval()
    raw.load_state_dict(act.state_dict())
    assert raw.config["kwargs"]["shortcut"] == "raw" and model_from_config(raw.config).layer2[0].raw_shortcut
    x = torch.rand(2, 3, 8, 8)
    seen: dict[str, torch.Tensor] = {}
    for name, m in (("act", act), ("raw", raw)):
        m.layer1.register_forward_hook(lambda mod, a, out, n=name: seen.__setitem__(n + "1", out))
        m.layer2[0].register_forward_pre_hook(lambda mod, a, n=name: seen.__setitem__(n + "in", a[0]))
        m.layer2[0].shortcut.register_forward_pre_hook(lambda mod, a, n=name: seen.__setitem__(n + "proj", a[0]))
    with torch.no_grad():
        out_act, out_raw = act(x), raw(x)
    assert torch.equal(seen["act1"], seen["raw1"])  # identity shortcut: the same block
    assert torch.equal(seen["rawproj"], seen["rawin"])  # raw: projection of the block input
    blk = act.layer2[0]
    torch.testing.assert_close(seen["actproj"], F.relu(blk.bn1(seen["actin"])))  # act: of relu(bn1(x))
    assert not torch.allclose(out_act, out_raw)
    with pytest.raises(ValueError, match="shortcut 'skip'"):
        build_model("preact18", num_classes=10, in_channels=3, width=4, shortcut="skip")
