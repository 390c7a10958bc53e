"""Numeric faults: a non-finite step is skipped on the device (weights, BN buffers, optimizer state,
step sizes and omega store bit-identical), logged with its step, and repeated faults stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apart_fast.cli import main
from apart_fast.config import ApartConfig, Config
from apart_fast.data import load_dataset
from apart_fast.engine import checkpoint
from apart_fast.engine.loop import Run, train
from apart_fast.methods import METHOD_CLASSES
from apart_fast.methods.clean import Clean
from apart_fast.step.guard import conditional_step, finite_flag

BAD_STEP = 3


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0, synthetic_size=128)


def config(method: str, **kw) -> Config:
    apart = kw.pop("apart", ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e-3))
    return Config(method=method, dataset="synthetic", model="smallcnn", width=4, epochs=2, batch_size=32,
                  pgd_steps=2, free_replays=2, eval_n=0, final_eval_steps=0, log_interval=2, apart=apart, **kw)


def tensors(obj) -> list[torch.Tensor]:  # noqa: ANN001
    """Every tensor in a nested state dict, cloned, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def learned_state(method) -> list[torch.Tensor]:  # noqa: ANN001
    """What a step may change, less the method's RNG (which advances on every step, skipped or not)."""
    own = {k: v for k, v in method.state_dict().items() if k != "generator"}
    return tensors(method.model.state_dict()) + tensors(method.optimizer.state_dict()["state"]) + tensors(own)


def inject(monkeypatch, cls: type, poison) -> dict[str, list[torch.Tensor]]:  # noqa: ANN001
    """Patch ``cls.step``: snapshot the state before step BAD_STEP (which ``poison`` spoils) and before the next."""
    orig, calls, snaps = cls.step, {"n": 0}, {}

    def step(self, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == BAD_STEP:
            snaps["before"] = learned_state(self)
            undo = poison(self, batch)
            out = orig(self, batch)
            if undo is not None:
                undo()
            return out
        if calls["n"] == BAD_STEP + 1:
            snaps["after"] = learned_state(self)  # taken after the engine restored the BN buffers
        return orig(self, batch)

    monkeypatch.setattr(cls, "step", step)
    return snaps


def nan_image(method, batch) -> None:  # noqa: ANN001
    batch.x[0, 0, 0, 0] = float("nan")  # the forward pass turns it into a NaN loss (and NaN BN statistics)


def check_skipped(snaps: dict, res: dict, out: Path) -> None:
    before, after = snaps["before"], snaps["after"]
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert res["skipped_steps"] == 1
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite"] == [BAD_STEP]
    final = tensors(res["model"].state_dict())
    assert all(torch.isfinite(t.float()).all() for t in final)
    assert any(not torch.equal(a, b) for a, b in zip(before, final))  # training went on after the fault


@pytest.mark.parametrize("method", ["clean", "fgsm_rs", "free", "pgd", "apart"])
def test_nan_loss_step_is_skipped_bit_exactly(method, data, tmp_path, monkeypatch, capsys):
    snaps = inject(monkeypatch, METHOD_CLASSES[method], nan_image)
    res = train(config(method, out=str(tmp_path)), progress=False, data=data)
    check_skipped(snaps, res, tmp_path)
    assert f"non-finite loss or gradient at step {BAD_STEP}" in capsys.readouterr().err


def test_apart_nan_step_size_gradient_skips_model_steps_and_omega(data, tmp_path, monkeypatch):
    """A finite loss but a NaN gradient of one step size: nothing may move, the omega store included."""

    def nan_grad(method, batch):  # noqa: ANN001, ANN202
        h = method.a_in.register_hook(lambda g: g * float("nan"))
        return h.remove

    snaps = inject(monkeypatch, METHOD_CLASSES["apart"], nan_grad)
    res = train(config("apart", out=str(tmp_path)), progress=False, data=data)
    check_skipped(snaps, res, tmp_path)


def test_repeated_faults_stop_the_run_with_a_usable_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Clean, "perturb", lambda self, batch: batch.x * float("nan"))
    out = tmp_path / "run"
    rc = main(["train", "--method", "clean", "--dataset", "synthetic", "--model", "smallcnn", "--width", "4",
               "--batch-size", "64", "--epochs", "1", "--eval-n", "0", "--final-eval-steps", "0", "--no-progress",
               "--max-faults", "3", "--log-interval", "2", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("apart-fast: error: stopped after 4 non-finite steps")
    assert "checkpoint.pt holds the finite state after step 4 (epoch 1, step 4 of 16)" in err[-1] and "Traceback" not in "".join(err)
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["step_count"] == 4 and saved["faults"]["steps"] == [1, 2, 3, 4]
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [1, 2, 3, 4]


def test_max_step_clamps_run_away_step_sizes(data):
    apart = ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e4, weight_decay=0.0, max_step=0.05)
    run = Run(config("apart", apart=apart), data)
    run.train_epoch(progress=False)
    sizes = torch.cat([p.detach().reshape(-1) for p in run.method.step_sizes()])
    assert sizes.abs().max() <= 0.05 and (sizes.abs() == 0.05).any()


def test_conditional_step_undoes_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    ref = torch.nn.Parameter(p.detach().clone())
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.1)
    p0 = p.detach().clone()
    p.grad = torch.full((5,), float("nan"))
    ok = finite_flag(torch.tensor(1.0), [p.grad])
    assert not bool(ok)
    conditional_step(opt, ok)  # a faulty first step: nothing moves, the new momentum buffer is zero
    assert torch.equal(p.detach(), p0) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(5))
    for _ in range(3):  # later good steps match an optimizer that never saw the fault
        g = torch.randn(5)
        p.grad, ref.grad = g.clone(), g.clone()
        conditional_step(opt, finite_flag(torch.tensor(1.0), [p.grad]))
        ref_opt.step()
        assert torch.equal(p.detach(), ref.detach())
    assert bool(finite_flag(torch.tensor(2.0), [torch.ones(3)]))
    assert not bool(finite_flag(torch.tensor(float("inf")), [torch.ones(3)]))
