"""APART on models it did not write: sites hooked on from outside train exactly as marked ones, under
autocast and torch.compile too; the compact omega store and its memory check (methods/store.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.data import DeviceLoader
from apart_fast.methods import DataInfo, build_method
from apart_fast.methods import store as stores
from apart_fast.models import PreActBlock, build_model, find_sites
from apart_fast.models.attach import AttachedSite
from apart_fast.ops import reference
from apart_fast.step.schedule import CyclicSchedule

GEN = dict(a_init=0.02, a_in=0.02, a_layer=0.01, lr=1e-3)


class NoSite(nn.Module):
    """Stands in for a block's PerturbSite as plain code would: ``conv1(h)``, no marker."""

    def forward(self, h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return layer(h)


def unmarked(model: nn.Module) -> nn.Module:
    """The project's model with its sites removed: the same network as a user would have written it."""
    for m in model.modules():
        if isinstance(m, PreActBlock):
            m.site = NoSite()
    return model


def setup(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **cfg_kw):
    """APART on ``model`` with its optimizer attached, and a loader over (x, y) (as tests/methods/conftest.py)."""
    apart = cfg_kw.pop("apart", ApartConfig(**GEN))
    cfg = Config(method="apart", eps=8 / 255, batch_size=8, apart=apart, **cfg_kw)
    n, c, h, w = x.shape
    method = build_method("apart", model, cfg, DataInfo(n_train=n, channels=c, height=h, width=w, pad=2), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=cfg.weight_decay)
    method.attach(opt, CyclicSchedule(opt, 100, 0.1, (0.9, 0.8)), 100)
    return method, DeviceLoader(x, y, 8, pad=2, ragged="drop", seed=0)


def pair(x, y, **cfg_kw):
    """The same SmallCNN twice: with its own (marked) sites, and unmarked with sites hooked on by APART."""
    torch.manual_seed(0)
    marked = build_model("smallcnn", num_classes=10, in_channels=3, width=4)
    hooked = unmarked(build_model("smallcnn", num_classes=10, in_channels=3, width=4))
    hooked.load_state_dict(marked.state_dict())
    return setup(marked, x, y, **cfg_kw), setup(hooked, x, y, **cfg_kw)


def test_hooked_sites_train_exactly_as_marked_ones(images):
    x, y = images
    (marked, loader), (hooked, _) = pair(x, y, backend="torch")
    assert all(isinstance(s, AttachedSite) for s in hooked.sites) and len(hooked.sites) == len(marked.sites) == 2
    assert hooked.site_names == ["layer1.0.conv1", "layer2.0.conv1"]
    for batch in list(loader)[:3]:
        m_m, m_h = marked.step(batch), hooked.step(batch)
        assert torch.equal(m_m["loss"], m_h["loss"])
    assert torch.equal(marked.a_layer, hooked.a_layer) and not torch.equal(marked.a_layer, torch.full((2,), 0.01))
    for a, b in zip(marked.model.parameters(), hooked.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(marked.store, hooked.store)


def test_hooked_sites_keep_the_perturbation_under_bf16(images):
    """Under bf16 autocast a hooked site adds alpha * conv1(sign) in fp32 after conv1, as a marked site does:
    the step sizes' gradients agree with the marked model's to rounding, and with fp32's to a few percent."""
    x, y = images
    (marked, loader), (hooked, _) = pair(x, y, amp="bf16")
    batch = next(iter(loader))
    grads = {}
    for name, method, mode in (("marked", marked, "bf16"), ("hooked", hooked, "bf16"), ("fp32", hooked, "none")):
        from apart_fast.step.amp import Precision

        method.use(Precision(mode, torch.device("cpu")), method.comm)
        with torch.no_grad():
            method.a_layer.fill_(2e-3)  # small: a plain bf16 addition would round most of it away
        method.forward_backward(batch)
        grads[name] = method.a_layer.grad.clone()
    torch.testing.assert_close(grads["hooked"], grads["marked"], rtol=1e-3, atol=0)
    assert float((grads["hooked"] - grads["fp32"]).norm() / grads["fp32"].norm()) < 0.05


def test_hooked_model_compiles_and_matches_eager(images):
    x, y = images
    (eager, loader), (compiled, _) = pair(x, y, backend="torch")
    eager.model = unmarked(eager.model)  # both hooked now: the eager one by hand, through the same attach
    from apart_fast.models import attach_sites

    attach_sites(eager.model)
    eager.sites = find_sites(eager.model)
    torch._dynamo.reset()
    compiled.model = torch.compile(compiled.model, backend="aot_eager")
    for batch in list(loader)[:2]:
        torch.testing.assert_close(compiled.step(batch)["loss"], eager.step(batch)["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.a_layer, eager.a_layer, rtol=1e-5, atol=1e-7)
    assert not torch.equal(eager.a_layer, torch.full_like(eager.a_layer, 0.01))


def test_torchvision_vit_trains_with_two_sites_per_block(images):
    x, y = images
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10)
    method, loader = setup(vit, x, y)
    assert method.site_names == [f"encoder.layers.encoder_layer_{i}.{s}" for i in range(2) for s in ("self_attention", "mlp.0")]
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-initialises the head: no gradient would flow
    method.forward_backward(next(iter(loader)))
    assert bool((method.a_layer.grad != 0).all())
    method.step(next(iter(loader)))


def test_a_model_without_blocks_is_refused_with_the_real_flags(images):
    x, y = images
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match=r"it holds Conv2d x1, .*--apart-sites 3, .*\(--no-apart-layer-perturb; "
                                         r"in Python ApartConfig\(layer_perturb=False\)\)$"):
        setup(plain, x, y)
    method, _ = setup(plain, x, y, apart=ApartConfig(**GEN, layer_perturb=False))
    assert method.sites == [] and method.describe()[0].endswith("(--no-apart-layer-perturb)")


# ---- the compact store ----

def _window_case(n: int = 6, b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    store = torch.randn(n, 2, 7, 7, generator=g) * 1e-3
    index = torch.randint(n, (b,), generator=g)
    crop = torch.randint(0, 3, (b, 2), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    return store, index, crop, flip, g


@pytest.mark.parametrize("dtype,step", [("float16", 2.0**-11), ("int8", 1 / 254)])
@pytest.mark.parametrize("ratio", [0.3, 1e-3])
def test_compact_store_stays_within_its_rounding_of_float32(dtype, step, ratio):
    """After K updates a compact store differs from float32's by at most (K + 1) roundings (one for the start):
    the clamp to [-1, 1] is 1-Lipschitz, so a rounding never grows. float16 also rounds a 0-d ratio."""
    ref, index, crop, flip, g = _window_case()
    compact = stores.quantize(ref) if dtype == "int8" else ref.to(torch.float16)
    r = torch.tensor(ratio)
    k = 12
    for _ in range(k):
        grad = torch.randn(index.shape[0], 2, 5, 5, generator=g)
        stores.update(ref, index, crop, flip, grad, r, "torch")
        stores.update(compact, index, crop, flip, grad, r, "torch")
        gathered = stores.gather(compact, index, crop, flip, grad, "torch")
        assert gathered.dtype == torch.float32
    omega = compact.float() / stores.INT8_SCALE if dtype == "int8" else compact.float()
    bound = (k + 1) * step + (k * ratio * 2.0**-11 if dtype == "float16" else 0.0)
    err = float((omega - ref).abs().max())
    assert err <= bound
    if dtype == "int8" and ratio == 0.3:
        assert err > 0  # the comparison can fail: int8 does round what it stores
    assert compact.dtype == stores.DTYPES[dtype]


def test_compact_store_update_skips_as_float32_does():
    """A skipped step (g = 0, ratio -0.0) leaves an int8 store bit-identical, as the fused kernels do a float one."""
    ref, index, crop, flip, _ = _window_case()
    q = stores.quantize(ref.uniform_(-1, 1))
    before = q.clone()
    stores.update(q, index, crop, flip, torch.zeros(index.shape[0], 2, 5, 5), torch.tensor(-0.0), "torch")
    assert torch.equal(q, before)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_apart_runs_with_a_compact_store(images, make, dtype):
    x, y = images
    method, loader = make("apart", x, y, apart=ApartConfig(**GEN, store_dtype=dtype))
    full, _ = make("apart", x, y)
    assert method.store.dtype == stores.DTYPES[dtype] and method.store.shape == full.store.shape
    assert method.store.element_size() * 4 == full.store.element_size() * (2 if dtype == "float16" else 1)
    before = method.store.clone()
    for batch in list(loader)[:2]:
        assert torch.isfinite(method.step(batch)["loss"])
    assert not torch.equal(method.store, before)
    line = method.describe()[-1]
    assert f"per-example store 24 x 3 x 12 x 12 {dtype} = " in line and "--apart-store-dtype: float32" in line
    state = method.state_dict()
    method.store.zero_()
    method.load_state_dict(state)
    assert method.store.dtype == stores.DTYPES[dtype] and method.resolved()["store_dtype"] == dtype


def test_int8_gather_is_the_dequantised_window():
    ref, index, crop, flip, _ = _window_case()
    q = stores.quantize(ref.uniform_(-1, 1))
    like = torch.empty(index.shape[0], 2, 5, 5, dtype=torch.float64)
    got = stores.gather(q, index, crop, flip, like, "torch")
    assert got.dtype == torch.float64
    assert torch.equal(got, reference.omega_gather(q, index, crop, flip, (5, 5)).double() / 127)


def test_a_store_that_cannot_fit_is_refused_with_the_options(monkeypatch):
    monkeypatch.setattr(stores, "free_memory", lambda device: 100 * 2**20)
    shape = stores.store_shape(50_000, 3, 32, 32, 4)
    with pytest.raises(ConfigError) as err:
        stores.new_store(shape, "float32", 1e-3, 0, False, torch.device("cpu"))
    msg = str(err.value)
    assert msg.startswith("APART's per-example store (50000 examples x 3 x 40 x 40 float32) needs 1.8 GiB on cpu")
    assert "--apart-store-dtype float16 (457.8 MiB), --apart-store-dtype int8 (228.9 MiB)" in msg
    assert "--train-subset" in msg and "--no-apart-store" in msg and "\n" not in msg
    monkeypatch.setattr(stores, "free_memory", lambda device: 2**40)
    small = stores.store_shape(4, 3, 8, 8, 2)
    assert stores.new_store(small, "int8", 1e-3, 0, False, torch.device("cpu")).dtype == torch.int8


@pytest.mark.parametrize("apart,needle", [
    (ApartConfig(store_dtype="bf16"), "--apart-store-dtype 'bf16'; choose one of float32, float16, int8"),
    (ApartConfig(sites=" , "), "--apart-sites is empty; pass auto or comma-separated layer names"),
])
def test_bad_store_dtype_and_sites_are_one_line(apart, needle):
    with pytest.raises(ConfigError, match=needle):
        Config(apart=apart).validate()
