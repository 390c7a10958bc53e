"""Capture safety on the CPU (``engine.capture_check``): every step the engine captures into a CUDA graph, and the PGD
evaluation loop, run the branches CUDA runs and contain no host sync, data-dependent shape, host-device copy or
draw from a generator the graph does not own; a planted ``.item()`` (and each other kind) is caught where it is."""

from __future__ import annotations

import pytest
import torch

from apart_fast.engine import capture_check as cc
from apart_fast.methods.clean import Clean
from apart_fast.ops import dispatch


def _backend(name: str) -> str:
    if not dispatch.available(name):
        pytest.skip(dispatch.unavailable_reason(name))
    return name


@pytest.mark.parametrize("backend", cc.BACKENDS)
@pytest.mark.parametrize("method", cc.METHODS)
def test_captured_step_is_capture_safe(method: str, backend: str) -> None:
    """Fails on the branches only the CPU took before (``FlatSGD.step_if``'s and ``BufferGuard.restore_unless``'s
    ``bool(ok)``): ``--cuda-graphs`` now keeps or undoes with ``torch.where`` on every device."""
    found = cc.check_run(cc.tiny_config(method, _backend(backend)))
    assert not found, "\n".join(map(str, found))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["apart", "fgsm_rs"])
def test_captured_step_is_capture_safe_under_autocast(method: str, amp: str) -> None:
    """Autocast and fp16's on-device loss scale (unscale, finite check, scale update) are captured with the step."""
    found = cc.check_run(cc.tiny_config(method, "torch", amp))
    assert not found, "\n".join(map(str, found))


def test_gradalign_step_is_capture_safe_when_forced() -> None:
    """GradAlign stays eager (``capturable = False``: double backward under capture is unrun on a GPU), but nothing in
    its step would stop a capture: checked as if the engine captured it."""
    with cc.capturable("gradalign"):
        found = cc.check_run(cc.tiny_config("gradalign", "torch"))
    assert not found, "\n".join(map(str, found))


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_pgd_evaluation_loop_is_capture_safe(backend: str) -> None:
    found = cc.check_pgd_loop(_backend(backend))
    assert not found, "\n".join(map(str, found))


def test_planted_item_in_a_step_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``.item()`` planted in clean training's step is reported as a host read at the line that planted it."""
    perturb = Clean.perturb

    def planted(self, batch):  # noqa: ANN001, ANN202
        if batch.x.sum().item() > -1.0:  # the planted host read
            return perturb(self, batch)
        return batch.x

    monkeypatch.setattr(Clean, "perturb", planted)
    found = cc.check_run(cc.tiny_config("clean", "torch"))
    assert [(v.kind, v.op) for v in found] == [("host read", "aten._local_scalar_dense.default")]
    assert found[0].where.startswith("tests/engine/test_capture_check.py:") and found[0].where.endswith(" planted")


def test_each_kind_of_violation_is_caught() -> None:
    """One line each: what the checker reports for the other kinds (kind and op)."""
    x = torch.randn(8)
    owned, foreign = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    cases = {
        "if": (lambda: bool(x[0] > 0), "host read"),
        "equal": (lambda: torch.equal(x, x), "host read"),
        "where(mask)": (lambda: torch.where(x > 0), "data-dependent shape"),
        "mask index": (lambda: x[x > 0], "data-dependent shape"),
        "mask assign": (lambda: x.clone().__setitem__(x > 0, 0.0), "data-dependent shape"),
        "unique": (lambda: torch.unique(x), "data-dependent shape"),
        "repeat_interleave": (lambda: torch.repeat_interleave(torch.tensor([1, 2]).clone()), "data-dependent shape"),
        "tensor": (lambda: torch.tensor([1.0, 2.0]), "host-device copy"),
        "cpu": (lambda: x.cpu(), "host-device copy"),
        "tolist": (lambda: x.tolist(), "host-device copy"),
        "synchronize": (lambda: torch.cuda.synchronize(), "host-device copy"),
        "foreign generator": (lambda: torch.rand(3, generator=foreign), "foreign generator"),
    }
    for name, (fn, kind) in cases.items():
        found = cc.check(fn, [owned])
        assert kind in {v.kind for v in found}, (name, found)
    clean = [lambda: torch.rand(3, generator=owned), lambda: torch.where(x > 0, x, 0.0), lambda: x[torch.tensor([0, 2]).clone()],
             lambda: torch.rand(3), lambda: torch.repeat_interleave(x, 2)]
    for fn in clean:
        assert not [v for v in cc.check(fn, [owned]) if v.kind != "host-device copy"]


def test_main_reports_and_exits_nonzero_on_a_finding(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert cc.main(["--methods", "clean", "--backends", "torch"]) == 0
    assert "clean      torch   ok" in capsys.readouterr().out
    monkeypatch.setattr(Clean, "perturb", lambda self, batch: batch.x + float(batch.x.mean()))
    assert cc.main(["--methods", "clean", "--backends", "torch"]) == 1
    assert "host read: aten._local_scalar_dense.default at tests/engine/test_capture_check.py" in capsys.readouterr().out
