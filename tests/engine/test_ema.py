"""--ema: the sync-free update matches torch's AveragedModel exactly, its warm-up decay is as documented,
train() evaluates and saves the average, resume restores it bit for bit; on a GPU it is captured and never syncs."""

from __future__ import annotations

import json

import pytest
import torch
from reliability_helpers import signal_at
from torch.optim.swa_utils import AveragedModel

from apart_fast import load_model
from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.engine import checkpoint
from apart_fast.engine.ema import WeightAverage, ema_multi_avg_fn
from apart_fast.engine.faults import TrainingInterrupted
from apart_fast.engine.loop import Run, train
from apart_fast.methods import NFGSM
from apart_fast.models import build_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (graph capture, sync debug mode)")


def tiny(method: str, out, **kw) -> Config:
    kw = {"ema": 0.9, "epochs": 1, **kw}
    return Config(method=method, dataset="synthetic", width=4, batch_size=64, eval_n=32, eval_steps=1, final_eval_steps=1,
                  out=str(out), apart=ApartConfig(lr=1e-3, a_init=0.01, a_in=0.01, a_layer=0.01), **kw)


@pytest.mark.parametrize("warmup", [0.0, 10.0])
def test_update_matches_averaged_model_update_parameters(warmup):
    """Weights and BatchNorm buffers (use_buffers=True), the count, and num_batches_tracked (copied) equal
    what AveragedModel.update_parameters computes with the same averaging function, bit for bit."""
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=3, width=4)
    ours = WeightAverage(model, 0.9, warmup)
    ref = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.9, warmup), use_buffers=True)
    ref.update_parameters(model)  # its first call copies: our construction does the same
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = model(torch.rand(8, 3, 8, 8)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.update()
        ref.update_parameters(model)
    assert int(ours.averaged.n_averaged) == int(ref.n_averaged) == 6
    got, want = ours.module.state_dict(), ref.module.state_dict()
    assert any("running_mean" in k for k in want) and any("num_batches_tracked" in k for k in want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for k, v in model.state_dict().items():
        if "num_batches_tracked" in k:
            assert torch.equal(got[k], v)
        else:
            assert not torch.equal(got[k], v), k  # an average, not a copy


def test_warmup_decay():
    """The n-th update moves the average by 1 - min(decay, n / (n + W)) of the way to the model."""
    for n, warmup, decay in ((1, 10.0, 0.999), (90, 10.0, 0.999), (10_000, 10.0, 0.999), (1, 0.0, 0.99)):
        ema, cur = [torch.zeros(3)], [torch.ones(3)]
        ema_multi_avg_fn(decay, warmup)(ema, cur, torch.tensor(n))
        d = min(decay, n / (n + warmup))
        torch.testing.assert_close(ema[0], torch.full((3,), 1 - d), rtol=1e-6, atol=0)


def test_bad_ema_settings_are_one_line_errors():
    for kw, word in (({"ema": 1.0}, "--ema 1.0"), ({"ema": 0.0}, "--ema 0.0"), ({"ema": 0.9, "ema_warmup": -1.0}, "--ema-warmup")):
        with pytest.raises(ConfigError, match=word):
            Config(**kw).validate()


def test_train_evaluates_and_saves_the_average(tmp_path):
    res = train(tiny("fgsm_rs", tmp_path), progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["ema_decay"] == 0.9 and saved["ema_test_robust_acc"] is not None and saved["ema_test_clean_acc"] is not None
    net = load_model(str(tmp_path / "model_ema.pt"))
    for k, v in res["model_ema"].state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    assert not all(torch.equal(v, res["model"].state_dict()[k]) for k, v in net.state_dict().items())
    run = Run(tiny("fgsm_rs", tmp_path / "x"))
    ev = run.evaluate(run.data.test_x, run.data.test_y, steps=1, model=net)
    assert ev["clean_acc"] == saved["ema_test_clean_acc"] and ev["robust_acc"] == saved["ema_test_robust_acc"]
    off = train(tiny("fgsm_rs", tmp_path / "off", ema=None), progress=False)
    assert "ema_test_robust_acc" not in off and not (tmp_path / "off" / "model_ema.pt").exists()
    for k, v in off["model"].state_dict().items():  # the average leaves training as it is: the same last model
        assert torch.equal(v, res["model"].state_dict()[k]), k
    assert (off["test_clean_acc"], off["test_robust_acc"]) == (res["test_clean_acc"], res["test_robust_acc"])


def test_resume_restores_the_average_exactly(tmp_path, monkeypatch):
    """SIGINT mid-epoch 2 (step 16 + 5 of 16-step epochs), then resume: the average is the uninterrupted run's."""
    straight = train(tiny("nfgsm", tmp_path / "a", epochs=2), progress=False)
    signal_at(monkeypatch, NFGSM, 16 + 5)
    with pytest.raises(TrainingInterrupted):
        train(tiny("nfgsm", tmp_path / "b", epochs=2), progress=False)
    assert int(checkpoint.load(tmp_path / "b" / "checkpoint.pt")["ema"]["n_averaged"]) == 1 + 16 + 5
    monkeypatch.undo()
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    resumed = train(tiny("nfgsm", tmp_path / "b", epochs=2), resume=True, progress=False)
    for k, v in straight["model_ema"].state_dict().items():
        assert torch.equal(resumed["model_ema"].state_dict()[k], v), k
    assert resumed["ema_test_robust_acc"] == straight["ema_test_robust_acc"]


@gpu
@pytest.mark.gpu
def test_average_is_captured_with_the_step_and_never_syncs(tmp_path):
    """The EMA update is part of the captured step: replays move the average as eager steps do, with
    ``set_sync_debug_mode("error")`` on (it raises on any host sync)."""
    kw = dict(device="cuda", amp="none")
    eager = Run(tiny("fgsm_rs", tmp_path / "a", cuda_graphs=True, **kw))
    eager.stepper.capture = False  # type: ignore[union-attr]
    captured = Run(tiny("fgsm_rs", tmp_path / "b", cuda_graphs=True, **kw))
    for run in (eager, captured):
        it = iter(run.loader)
        run.model.train()
        for _ in range(5):
            run.stepper(next(it))  # type: ignore[misc]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                run.stepper(next(it))  # type: ignore[misc]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert captured.stepper.graph is not None  # type: ignore[union-attr]
    assert int(captured.ema.averaged.n_averaged) == 9  # type: ignore[union-attr]
    for p, q in zip(eager.ema.module.state_dict().values(), captured.ema.module.state_dict().values()):  # type: ignore[union-attr]
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
