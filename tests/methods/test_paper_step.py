"""``--preset paper`` takes the authors' step exactly: apart_fast's APART against a plain-PyTorch version of
the released script's step written here from ../shared/APART.md, in float64, over a few steps that include
the last partial batch. Weights, BatchNorm statistics, step sizes and the omega store must agree."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from apart_fast.config import Config
from apart_fast.data import DeviceLoader
from apart_fast.methods import DataInfo, build_method
from apart_fast.models import PreActBlock, build_model
from apart_fast.reproduce import PRESETS, method_config
from apart_fast.step.schedule import CyclicSchedule

N, C, H, W, PAD, B, EPOCHS = 20, 3, 8, 8, 2, 8, 2  # 20 = 8 + 8 + 4: the last batch is partial


def window(store, index, crop, flip):
    """The stored initialisation of each example, cropped and flipped like its pixels."""
    out = []
    for i, (dy, dx), f in zip(index.tolist(), crop.tolist(), flip.tolist()):
        win = store[i, :, dy : dy + H, dx : dx + W]
        out.append(win.flip(-1) if f else win)
    return torch.stack(out)


SCRIPT = {"lr": 5e-8, "a_init": 1e-4, "a_in": 1e-4, "a_layer": 0.0, "weight_decay": 400.0}  # APART.md


def script_run(model, store, batches, cfg: Config, gen: dict[str, float], total: int):
    """The script's training step (APART.md, steps 1-8) with PyTorch 1.3's zero_grad, as plain PyTorch."""
    eps = cfg.eps
    convs = [m.conv1 for m in model.modules() if isinstance(m, PreActBlock)]  # each takes relu(bn1(x))
    f64 = dict(dtype=torch.float64)
    a_init = torch.tensor(gen["a_init"], **f64, requires_grad=True)
    a_in = torch.tensor(gen["a_in"], **f64, requires_grad=True)
    a_layer = torch.full((len(convs),), gen["a_layer"], **f64, requires_grad=True)
    steps = [a_init, a_in, a_layer]
    # The step sizes are parameters of the script's model, so its SGD holds them too.
    model_opt = torch.optim.SGD([*model.parameters(), *steps], lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen_opt = torch.optim.SGD(steps, lr=0.0, momentum=cfg.momentum, weight_decay=gen["weight_decay"])
    scheds = [torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.0, max_lr=peak, step_size_up=total / 2,
                                                step_size_down=total / 2, base_momentum=cfg.momentum_low,
                                                max_momentum=cfg.momentum)
              for o, peak in ((model_opt, cfg.lr), (gen_opt, gen["lr"]))]
    for batch in batches:
        x, y = batch.x, batch.y
        omega = window(store, batch.index, batch.crop, batch.flip)
        d0 = torch.clamp(a_init * omega, -eps, eps)
        x0 = torch.clamp(x + d0, 0, 1).detach().requires_grad_(True)
        hs: list[torch.Tensor] = []
        hooks = [c.register_forward_pre_hook(lambda m, i, hs=hs: hs.append(i[0])) for c in convs]
        loss1 = F.cross_entropy(model(x0), y)
        for h in hooks:
            h.remove()
        g = torch.autograd.grad(loss1, [x0, *hs])
        d1 = torch.clamp(d0 + a_in * torch.sign(g[0]), -eps, eps)
        x1 = torch.clamp(x + d1, 0, 1)
        x1.retain_grad()
        signs = [torch.sign(t) for t in g[1:]]
        hooks = [c.register_forward_pre_hook(lambda m, i, k=k, s=signs: (i[0] + a_layer[k] * s[k],)) for k, c in enumerate(convs)]
        loss2 = F.cross_entropy(model(x1), y)
        for h in hooks:
            h.remove()
        ratio = (a_in / (a_init + 1e-7)).detach()
        model_opt.zero_grad(set_to_none=False)
        loss2.backward()
        for p in steps:
            p.grad.neg_()
        gen_opt.step()
        for p in steps:
            p.grad.zero_()  # PyTorch 1.3's zero_grad: zeros, so the model's SGD still decays them
        model_opt.step()
        for s in scheds:
            s.step()
        new = torch.clamp(omega + ratio * torch.sign(x1.grad), -1, 1)
        for b, (i, (dy, dx), f) in enumerate(zip(batch.index.tolist(), batch.crop.tolist(), batch.flip.tolist())):
            store[i, :, dy : dy + H, dx : dx + W] = new[b].flip(-1) if f else new[b]
    return [p.detach() for p in steps]


def paper_config(**apart: float) -> Config:
    """The paper preset's config with the test's batch size (and optionally larger generator settings)."""
    cfg = method_config("apart", PRESETS["paper"], epochs=EPOCHS, width=4, n_train=N, device="cpu", seed=0,
                        data_dir=None, out=None)
    cfg.batch_size = B
    cfg.apart = dataclasses.replace(cfg.apart, **apart)
    return cfg


def run_both(cfg: Config, gen: dict[str, float]):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (N,), generator=g)
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=C, width=4, shortcut=cfg.shortcut).double()
    info = DataInfo(n_train=N, channels=C, height=H, width=W, pad=PAD)
    ragged = "keep" if cfg.keep_last_batch else "drop"
    loader = DeviceLoader(x, y, B, pad=PAD, ragged=ragged, seed=0)
    total = EPOCHS * len(loader)
    batches = []
    for _ in range(EPOCHS):
        for b in loader:
            b.x = b.x.double()
            batches.append(b)
    ref_model = copy.deepcopy(model)
    method = build_method("apart", model, cfg, info, torch.device("cpu"))
    method.store = method.store.double().uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    assert (method.gen.a_init, method.gen.a_in, method.gen.a_layer) == (gen["a_init"], gen["a_in"], gen["a_layer"])
    for p, k in zip(method.step_sizes(), ("a_init", "a_in", "a_layer")):
        p.data = torch.full_like(p.data, gen[k], dtype=torch.float64)  # the start exactly, not its float32 rounding
    ref_store = method.store.clone()
    opt = torch.optim.SGD(list(model.parameters()) + method.extra_model_params(), lr=0.0, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = CyclicSchedule(opt, total, cfg.lr, (cfg.momentum, cfg.momentum_low))
    method.attach(opt, sched, total)
    assert method.gen.lr == gen["lr"]
    for b in batches:
        method.step(b)  # advances both schedules
    ref_steps = script_run(ref_model, ref_store, batches, cfg, gen, total)
    return method, ref_model, ref_store, ref_steps, batches


@pytest.mark.parametrize("apart", [{}, {"lr": 2e-3, "a_init": 0.02, "a_in": 0.01, "a_layer": 0.01}],
                         ids=["paper", "paper-larger-generator"])
def test_paper_preset_is_the_scripts_step(apart):
    cfg = paper_config(**apart)
    assert (cfg.eps, cfg.shortcut, cfg.keep_last_batch, cfg.amp) == (0.031, "raw", True, "none")
    assert cfg.apart.schedule == "script" and cfg.apart.legacy_model_decay
    method, ref_model, ref_store, ref_steps, batches = run_both(cfg, {**SCRIPT, **apart})
    assert len(batches) == 6 and batches[2].x.shape[0] == N - 2 * B  # the partial batch was trained on
    for got, want in zip(method.step_sizes(), ref_steps):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-15)
    for (name, got), want in zip(method.model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(method.store, ref_store, rtol=0, atol=1e-12)


def test_the_comparison_sees_the_legacy_decay():
    """Without PyTorch 1.3's extra decay the step sizes end elsewhere: the comparison above can fail."""
    cfg = paper_config(lr=2e-3, a_init=0.02, a_in=0.01, a_layer=0.01)
    cfg.apart = dataclasses.replace(cfg.apart, legacy_model_decay=False)
    method, _, _, ref_steps, _ = run_both(cfg, {**SCRIPT, "lr": 2e-3, "a_init": 0.02, "a_in": 0.01, "a_layer": 0.01})
    assert not torch.allclose(method.a_in.detach(), ref_steps[1], rtol=1e-10, atol=1e-15)
