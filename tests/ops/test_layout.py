"""Layout-native ops: channels_last (and any shared dense layout) runs as is, gives NCHW's values, keeps its format.

The fused backends take the tensors of one op in their own memory format when they share it, and allocate
outputs with ``empty_like``; only a strided view or an argument laid out unlike the op's first tensor is
copied (once). The last test runs a channels_last APART step and reads the profiler's op list: no copy of a
4-D tensor happens inside an op (forward or backward).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ops_testutil import assert_exact, rand, randn

from apart_fast import ops
from apart_fast.config import ApartConfig, Config
from apart_fast.data import DeviceLoader
from apart_fast.methods import DataInfo, build_method
from apart_fast.models import build_model
from apart_fast.ops import reference as R
from apart_fast.step.schedule import CyclicSchedule

EPS = 8 / 255
SHAPE = (3, 5, 6, 7)
COPIES = ("aten::copy_", "aten::clone", "aten::contiguous")
OPS = ("perturb_init", "sign_step", "pack_sign", "layer_perturb", "pgd_step", "omega_gather", "omega_update")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _run_all(backend: str, xl, dl, g, omega, go, al):
    """Every differentiable op forward and backward (leaves ``xl``, ``dl``, ``al``), pack_sign and pgd_step."""
    x = xl.detach()
    x0, d0 = ops.perturb_init(xl, omega, al, EPS, backend=backend)
    x1, d1 = ops.sign_step(xl, dl, g, al, EPS, backend=backend)
    s = ops.pack_sign(g, backend=backend)
    h = ops.layer_perturb(xl, s, al, backend=backend)
    grads = torch.autograd.grad([x0, d0, x1, d1, h], [xl, dl, al], [go] * 5)
    return [x0, d0, x1, d1, s, h, ops.pgd_step(x, x, g, 2 * EPS, EPS, backend=backend), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_matches_nchw(backend: str, dtype) -> None:
    """Same values as NCHW inputs (step-size gradients: the same sum in another order); outputs stay channels_last."""
    x, d, g = rand(SHAPE, dtype, 1), rand(SHAPE, dtype, 2, -EPS, EPS), randn(SHAPE, dtype, 3)
    omega, go, a = rand(SHAPE, dtype, 4, -1, 1), randn(SHAPE, dtype, 5, 0.0), torch.tensor(0.05)
    want = _run_all(backend, _leaf(x), _leaf(d), g, omega, go, _leaf(a))
    got = _run_all(backend, _leaf(_cl(x)), _leaf(_cl(d)), _cl(g), _cl(omega), _cl(go), _leaf(a))
    for i, (u, v) in enumerate(zip(got, want)):
        if u.dim() == 4:
            assert_exact(u.contiguous(), v.contiguous(), f"output {i}")
            assert _is_cl(u) or backend == "torch", f"output {i} has strides {u.stride()}"
        else:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_mixed_layouts_give_the_reference(backend: str) -> None:
    """x NCHW, g channels_last (a channels_last model's input gradient): matched to x's layout, same values."""
    x, d, g, a = rand(SHAPE, torch.float32, 6), rand(SHAPE, torch.float32, 7, -EPS, EPS), randn(SHAPE, torch.float32, 8), \
        torch.tensor(0.01)
    x1, d1 = ops.sign_step(x, d, _cl(g), a, EPS, backend=backend)
    rx1, rd1 = R.sign_step(x, d, g, a, EPS)
    assert_exact(x1, rx1, "x1")
    assert_exact(d1, rd1, "d1")
    assert_exact(ops.pgd_step(_cl(x), x, g, 0.01, EPS, backend=backend), R.pgd_step(x, x, g, 0.01, EPS), "pgd")


def test_omega_store_channels_last(backend: str) -> None:
    """A channels_last store gathers channels_last windows; updates through g of any layout land where NCHW's do."""
    gen = torch.Generator().manual_seed(9)
    store = torch.rand(6, 3, 9, 10, generator=gen) * 2 - 1
    index, crop = torch.tensor([4, 1, 4, 0]), torch.randint(0, 3, (4, 2), generator=gen)
    flip = torch.tensor([True, False, True, False])
    g = torch.randn(4, 3, 7, 8, generator=gen)
    out = ops.omega_gather(_cl(store), index, crop, flip, (7, 8), backend=backend)
    assert_exact(out.contiguous(), R.omega_gather(store, index, crop, flip, (7, 8)), "gather")
    assert _is_cl(out) or backend == "torch"
    ref, cl = store.clone(), _cl(store)
    R.omega_update(ref, index, crop, flip, g, torch.tensor(0.3))
    ops.omega_update(cl, index, crop, flip, _cl(g), torch.tensor(0.3), backend=backend)
    assert _is_cl(cl)
    assert_exact(cl.contiguous(), ref, "update")


def _profile(fn) -> torch.profiler.profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return prof


def _copies_in(prof: torch.profiler.profile, inside) -> list[str]:
    """4-D copies (``aten::copy_``/``clone``/``contiguous``) whose enclosing events include one that ``inside`` accepts."""
    found = []
    for e in prof.events():
        if e.name not in COPIES or not any(len(s) == 4 for s in e.input_shapes):
            continue
        parent = e.cpu_parent
        while parent is not None and not inside(parent.name):
            parent = parent.cpu_parent
        if parent is not None:
            found.append(f"{e.name}{e.input_shapes} in {parent.name}")
    return found


def test_channels_last_ops_copy_nothing(fused: str) -> None:
    """On channels_last inputs the fused ops, forward and backward, issue no copy at all."""
    x, d, g = _cl(rand(SHAPE, torch.float32, 10)), _cl(rand(SHAPE, torch.float32, 11, -EPS, EPS)), \
        _cl(randn(SHAPE, torch.float32, 12))
    omega, go = _cl(rand(SHAPE, torch.float32, 13, -1, 1)), _cl(randn(SHAPE, torch.float32, 14, 0.0))
    xl, dl, al = _leaf(x), _leaf(d), _leaf(torch.tensor(0.05))
    prof = _profile(lambda: _run_all(fused, xl, dl, g, omega, go, al))
    copies = [f"{e.name}{e.input_shapes}" for e in prof.events() if e.name in COPIES and e.input_shapes[0]]
    assert not copies, copies


def _apart_step(backend: str):
    """A channels_last APART step on PreAct-18 (width 8, batch 8, 8x8 images): method, loader, channels_last batch.

    Width 8, not 4: torch 2.14's CPU channels_last convolution backward corrupts the heap at 4 channels (aborts).
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (16,), generator=gen)
    cfg = Config(method="apart", eps=EPS, batch_size=8, backend=backend,
                 apart=ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e-3))
    model = build_model("preact18", num_classes=10, in_channels=3, width=8).to(memory_format=torch.channels_last)
    info = DataInfo(n_train=16, channels=3, height=8, width=8, pad=2, channels_last=True)
    method = build_method("apart", model, cfg, info, torch.device("cpu"))
    assert _is_cl(method.store)  # the store in the batches' format: omega_gather returns channels_last windows
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    method.attach(opt, CyclicSchedule(opt, 10, 0.1, (0.9, 0.8)), 10)
    batch = next(iter(DeviceLoader(x, y, 8, pad=2, ragged="drop", seed=0, channels_last=True)))
    assert _is_cl(batch.x)
    return method, batch


@pytest.mark.parametrize("crop,flip", [(True, True), (False, True), (False, False)])
def test_channels_last_loader_gives_nchw_values(crop: bool, flip: bool) -> None:
    """The loader's channels_last batches hold exactly the NCHW loader's images, augmentation records alike."""
    x = torch.randint(0, 256, (12, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = torch.arange(12) % 10
    kw = dict(pad=2, crop=crop, flip=flip, ragged="drop", seed=3)
    for a, b in zip(DeviceLoader(x, y, 4, **kw), DeviceLoader(x, y, 4, channels_last=True, **kw)):
        assert _is_cl(b.x) and not _is_cl(a.x)
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index) and torch.equal(a.crop, b.crop)


def test_engine_hands_channels_last_batches_and_store_to_the_method() -> None:
    """--channels-last: the engine's loader and APART's store use the model's format, so the step converts nothing."""
    from apart_fast.engine.loop import Run

    cfg = Config(method="apart", dataset="synthetic", model="preact18", width=8, epochs=1, batch_size=16, eval_n=0,
                 final_eval_steps=0, device="cpu", channels_last=True)
    run = Run(cfg)
    assert _is_cl(next(iter(run.loader)).x) and _is_cl(run.method.store)
    assert not _is_cl(next(iter(Run(dataclasses.replace(cfg, channels_last=False)).loader)).x)


def test_channels_last_apart_step_copies_no_activation_inside_the_ops(fused: str, monkeypatch) -> None:
    """One APART step (both passes, backward, omega update) in channels_last: the profiler sees no 4-D copy inside
    any fused op, forward (each op wrapped in a profiler range here) or backward (the ops' autograd nodes)."""
    for name in OPS:
        fn = getattr(ops, name)

        def ranged(*args, _fn=fn, _name=name, **kwargs):
            with torch.profiler.record_function(f"apart_fast.ops.{_name}"):
                return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, ranged)
    method, batch = _apart_step(fused)
    prof = _profile(lambda: method.step(batch))
    names = {e.name for e in prof.events()}
    assert {"apart_fast.ops.layer_perturb", "apart_fast.ops.omega_update", "SignStepBackward"} <= names
    backward_nodes = ("PerturbInitBackward", "SignStepBackward", "LayerPerturbBackward")
    assert not _copies_in(prof, lambda n: n.startswith("apart_fast.ops.") or n in backward_nodes)
