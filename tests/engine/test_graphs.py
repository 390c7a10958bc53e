"""The capturable step: device-tensor SGD and schedule match torch's, the static-buffer step path
matches the plain one on the CPU; on a GPU, captured replays match eager steps and never sync."""

from __future__ import annotations

import pytest
import torch

from apart_fast.config import ApartConfig, Config
from apart_fast.engine import checkpoint
from apart_fast.engine.capture_check import capturable
from apart_fast.engine.loop import Run, train
from apart_fast.step.optim import DeviceSGD
from apart_fast.step.schedule import CyclicSchedule, DeviceSchedule

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (graph capture, sync debug mode)")


def test_device_sgd_and_schedule_match_torch():
    """Same lr/momentum values bit for bit (the same float64 formula); parameters equal up to rounding
    (torch fuses ``p - lr*buf`` in one op, DeviceSGD rounds ``lr*buf`` first: <= 1 ulp per step)."""
    torch.manual_seed(0)
    a = [torch.randn(5, 3), torch.randn(7)]
    b = [t.clone() for t in a]
    opt_a = torch.optim.SGD(a, lr=0.0, momentum=0.9, weight_decay=5e-4)
    opt_b = DeviceSGD(b, lr=0.0, momentum=0.9, weight_decay=5e-4)
    sched_a, sched_b = CyclicSchedule(opt_a, 20, 0.2, (0.9, 0.8)), DeviceSchedule(opt_b, 20, 0.2, (0.9, 0.8))
    for _ in range(20):
        grads = [torch.randn_like(t) for t in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        assert torch.float32 == sched_b.lr.dtype
        assert float(sched_b.lr) == float(torch.tensor(opt_a.param_groups[0]["lr"], dtype=torch.float32))
        assert float(sched_b.momentum) == float(torch.tensor(opt_a.param_groups[0]["momentum"], dtype=torch.float32))
        opt_a.step()
        opt_b.step()
        sched_a.step()
        sched_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    assert sched_b.state_dict() == sched_a.state_dict() == {"t": 20}
    assert set(opt_b.state_dict()["state"][0]) == set(opt_a.state_dict()["state"][0])  # checkpoints interchangeable


def tiny(method: str, out, **kw) -> Config:
    return Config(method=method, dataset="synthetic", width=4, batch_size=64, epochs=1, eval_n=32, eval_steps=1,
                  final_eval_steps=0, out=str(out), apart=ApartConfig(lr=1e-3, a_init=0.01, a_in=0.01, a_layer=0.01), **kw)


@pytest.mark.parametrize("method", ["apart", "pgd"])
def test_static_buffer_step_matches_plain_step_on_cpu(tmp_path, method):
    """--cuda-graphs on the CPU: the capturable code path (static batch buffers, DeviceSGD, device
    schedule) runs eagerly and trains what the plain path trains, up to DeviceSGD's rounding."""
    plain = train(tiny(method, tmp_path / "plain", pgd_steps=2), progress=False)
    graph = train(tiny(method, tmp_path / "graph", pgd_steps=2, cuda_graphs=True), progress=False)
    for (k, p), q in zip(plain["model"].state_dict().items(), graph["model"].state_dict().values()):
        # DeviceSGD rounds differently; a few APART sign flips grow that to ~2e-4 in BatchNorm statistics
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-3, msg=k)
    sa, sb = checkpoint.load(tmp_path / "plain" / "checkpoint.pt"), checkpoint.load(tmp_path / "graph" / "checkpoint.pt")
    assert sa["schedule"] == sb["schedule"]
    if method == "apart":
        # the step sizes' gradients come from those models, so they carry the same ~2e-4 relative spread
        for x, y in zip(sa["method"]["step_sizes"], sb["method"]["step_sizes"]):
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-6)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["apart", "pgd", "clean", "fgsm_rs", "nfgsm", "free", "gradalign"])
def test_captured_step_matches_eager_on_gpu(tmp_path, monkeypatch, method):
    """Replays of the captured step train what the same step run eagerly trains. cuDNN runs deterministic
    algorithms, the same in both runs (no benchmarking): otherwise its atomics change gradients by ~1e-6,
    enough to flip the sign of a near-zero dL/dx1 entry and move that omega entry by up to 2."""
    kw = dict(device="cuda", amp="none", pgd_steps=2, free_replays=2)
    with capturable(method):  # GradAlign stays eager in the engine: this is the check that would let it be captured
        eager = Run(tiny(method, tmp_path / "a", cuda_graphs=True, **kw))
        eager.stepper.capture = False  # type: ignore[union-attr]
        captured = Run(tiny(method, tmp_path / "b", cuda_graphs=True, **kw))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # after Run, which turns it on
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    for run in (eager, captured):
        it = iter(run.loader)
        run.model.train()
        for _ in range(8):  # 3 warm-up steps, the capture, 4 more replays
            run.stepper(next(it))  # type: ignore[misc]
    torch.cuda.synchronize()
    assert captured.stepper.graph is not None and eager.stepper.graph is None  # type: ignore[union-attr]
    for p, q in zip(eager.model.state_dict().values(), captured.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    if method == "apart":
        for p, q in zip(eager.method.step_sizes(), captured.method.step_sizes()):  # type: ignore[attr-defined]
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-8)
        moved = (captured.method.store - eager.method.store).abs() > 1e-3  # type: ignore[attr-defined]
        assert int(moved.sum()) <= moved.numel() // 1000, f"{int(moved.sum())} of {moved.numel()} omega entries differ"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_steady_state_step_never_syncs(tmp_path, amp):
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any host sync: none happens in a replayed
    APART step (batch copy into the static buffers, replay, the loop's on-device metric sums and flags)."""
    run = Run(tiny("apart", tmp_path, device="cuda", amp=amp, cuda_graphs=True))
    run.model.train()
    batches = list(run.loader)[:8]
    for b in batches[:5]:
        run.stepper(b)  # type: ignore[misc]
    torch.cuda.synchronize()
    sums: dict[str, torch.Tensor] = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, b in enumerate(batches[5:]):
            m, ok, fault = run.stepper(b)  # type: ignore[misc]
            run.faults.record(100 + i, ~fault)
            for k, v in m.items():
                v = torch.where(ok, v, torch.zeros_like(v))
                sums[k] = sums[k] + v if k in sums else v.clone()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert float(sums["n"]) == 3 * 64


@gpu
@pytest.mark.gpu
def test_free_resumes_on_the_gpu(tmp_path):
    """Checkpoints are read onto the CPU: Free's carried perturbation must come back on the run's device."""
    out = tmp_path / "run"
    train(tiny("free", out, device="cuda", free_replays=2, epochs=2), progress=False)
    train(tiny("free", out, device="cuda", free_replays=2, epochs=4), resume=True, progress=False)
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 2
