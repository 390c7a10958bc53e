"""What ``Run`` sets up before training: ``--device cuda:N`` becomes the current CUDA device (graph capture,
streams and Triton launches follow the current device, not the tensors'); ``--compile-backend`` is checked."""

from __future__ import annotations

import pytest
import torch

from apart_fast.config import ApartConfig, Config, ConfigError
from apart_fast.engine.device import resolve_device
from apart_fast.engine.run import Run


def test_cuda_n_becomes_the_current_device(monkeypatch):
    """Checked on the CPU with torch.cuda's entry points stubbed: cuda:N is selected, bare cuda keeps the
    current device, and an index past the last device is one line naming the valid range."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda") and len(chosen) == 1
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\); use cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu") and len(chosen) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_captured_apart_step_runs_on_cuda_1(tmp_path):
    cfg = Config(method="apart", dataset="synthetic", width=4, batch_size=64, epochs=1, eval_n=32, eval_steps=1,
                 final_eval_steps=0, out=str(tmp_path), device="cuda:1", cuda_graphs=True,
                 apart=ApartConfig(lr=1e-3, a_init=0.01, a_in=0.01, a_layer=0.01))
    try:
        run = Run(cfg)
        assert torch.cuda.current_device() == 1
        run.model.train()
        for batch in list(run.loader)[:5]:  # 3 warm-up steps, the capture, one replay
            metrics, ok, _ = run.stepper(batch)  # type: ignore[misc]
        torch.cuda.synchronize(1)
        assert run.stepper.graph is not None  # type: ignore[union-attr]
        assert bool(ok) and float(metrics["n"]) == 64
        assert all(p.device == torch.device("cuda", 1) for p in run.model.parameters())
        assert bool(torch.isfinite(run.method.store).all())  # type: ignore[attr-defined]
    finally:
        torch.cuda.set_device(0)


def test_unknown_compile_backend_is_one_line(tmp_path):
    cfg = Config(method="clean", dataset="synthetic", width=4, batch_size=32, epochs=1, out=str(tmp_path), compile=True,
                 compile_backend="nope")
    with pytest.raises(ConfigError, match="--compile-backend 'nope' is not a torch.compile backend; use inductor"):
        Run(cfg)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_a_run_turns_tf32_off(amp):
    """TF32 (cuDNN's default for fp32 convolutions on Ampere and later) would run --amp none and the fp32 stem under
    autocast with a ~5e-4 spacing near 1: every run turns it off, for convolutions and matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        Run(Config(method="clean", dataset="synthetic", width=4, batch_size=32, epochs=1, amp=amp))
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
