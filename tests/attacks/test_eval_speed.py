"""Evaluation speed paths: the CPU runs the fused C++ pgd_step; on CUDA the PGD loop is one captured graph per
batch shape and gives the eager loop's numbers (GPU tests skip without one)."""

from __future__ import annotations

import pytest
import torch

from apart_fast.attacks import evaluate
from apart_fast.attacks.pgd import CPU_BATCH, PGDLoop, _pgd, auto_batch_size, ce_loss
from apart_fast.models import SmallCNN
from apart_fast.ops import dispatch

EPS = 8 / 255
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN(num_classes=10, in_channels=3, width=4).to(device).eval()


def test_cpu_evaluation_runs_the_fused_cpp_step(monkeypatch):
    if not dispatch.available("cpp"):
        pytest.skip(f"the C++ extension is not built: {dispatch.unavailable_reason('cpp')}")
    used: list[str] = []
    real = dispatch.module

    def spy(name: str):
        used.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "module", spy)
    model = _model()
    x, y = torch.rand(20, 3, 8, 8), torch.randint(0, 10, (20,))
    fused = evaluate(model, x, y, steps=3, batch_size=8)
    assert used and set(used) == {"cpp"}, used
    assert fused == evaluate(model, x, y, steps=3, batch_size=8, backend="torch")  # same numbers as the reference
    assert auto_batch_size(model, (3, 8, 8), torch.device("cpu")) == CPU_BATCH


def test_graph_loop_on_cpu_runs_the_same_body_eagerly():
    model = _model()
    x, y = torch.rand(9, 3, 8, 8), torch.randint(0, 10, (9,))
    loop = PGDLoop(model, ce_loss, EPS, EPS / 4, 3, "auto", graphs=True)
    g = torch.Generator().manual_seed(0)
    a = _pgd(model, x, y, EPS, EPS / 4, 3, 2, ce_loss, True, g, "auto", loop)
    b = _pgd(model, x, y, EPS, EPS / 4, 3, 2, ce_loss, True, torch.Generator().manual_seed(0), "auto")
    assert loop.captures == 0 and torch.equal(a, b)


@cuda
def test_cuda_graph_loop_matches_eager_with_one_capture_per_shape():
    model = _model("cuda")
    x, y = torch.rand(20, 3, 8, 8, device="cuda"), torch.randint(0, 10, (20,), device="cuda")
    loop = PGDLoop(model, ce_loss, EPS, EPS / 4, 5, "auto", graphs=True)
    g1, g2 = torch.Generator("cuda").manual_seed(0), torch.Generator("cuda").manual_seed(0)
    for i in range(0, 20, 8):  # batch shapes 8, 8, 4
        xb, yb = x[i : i + 8], y[i : i + 8]
        graphed = _pgd(model, xb, yb, EPS, EPS / 4, 5, 2, ce_loss, True, g1, "auto", loop)
        eager = _pgd(model, xb, yb, EPS, EPS / 4, 5, 2, ce_loss, True, g2, "auto")
        torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-6)
    assert loop.captures == 2
    a = evaluate(model, x, y, steps=5, batch_size=8)
    b = evaluate(model, x, y, steps=5, batch_size=8, cuda_graphs=False)
    assert a == b
    size = auto_batch_size(model, (3, 8, 8), torch.device("cuda"))
    assert 1 <= size <= 4096 and size & (size - 1) == 0


def test_evaluate_reuses_a_given_loop_and_refuses_one_for_another_attack():
    """eval_speed times replays only: one PGDLoop across evaluate calls (its graphs captured once, on CUDA)."""
    model = _model()
    x, y = torch.rand(10, 3, 8, 8), torch.randint(0, 10, (10,))
    loop = PGDLoop(model, ce_loss, EPS, EPS / 4, 3, "auto")
    calls: list[int] = []
    body = loop.body
    loop.body = lambda *a: calls.append(1) or body(*a)  # type: ignore[method-assign]
    assert evaluate(model, x, y, eps=EPS, step=EPS / 4, steps=3, batch_size=4, loop=loop) == \
        evaluate(model, x, y, eps=EPS, step=EPS / 4, steps=3, batch_size=4)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="another model or attack"):
        evaluate(model, x, y, eps=EPS, step=EPS / 2, steps=3, batch_size=4, loop=loop)


def test_eval_speed_reports_backend_and_capture_seconds():
    import importlib.util

    from apart_fast.bench.env import REPO_ROOT

    spec = importlib.util.spec_from_file_location("eval_speed", REPO_ROOT / "benchmarks" / "eval_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = _model()
    ips, capture_s = mod.measure(model, torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,)), 8)
    assert ips > 0 and capture_s >= 0.0
