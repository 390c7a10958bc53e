"""Backend selection, availability errors and input checks of the public ops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from apart_fast import ops
from apart_fast.ops import dispatch
from apart_fast.ops.functions import PerturbInit


def _inputs(dtype=torch.float32):
    x = torch.rand(2, 3, 4, 4, dtype=dtype)
    return x, torch.zeros_like(x), torch.randn_like(x), torch.tensor(0.01, requires_grad=True)


def _backward_name(out: torch.Tensor) -> str:
    return type(out.grad_fn).__name__


def test_auto_picks_cpp_for_cpu_tensors() -> None:
    expected = "cpp" if dispatch.available("cpp") else "torch"
    assert dispatch.resolve("auto", torch.device("cpu")) == expected
    x, d, g, a = _inputs()
    x1, _ = ops.sign_step(x, d, g, a, 8 / 255)
    assert ("SignStep" in _backward_name(x1)) == (expected == "cpp")


def test_auto_for_cuda_tensors_never_queries_a_device() -> None:
    name = dispatch.auto_backend(torch.device("cuda"))
    expected = "cuda" if dispatch.available("cuda") else "triton" if dispatch.available("triton") else "torch"
    assert name == expected


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    x, d, g, a = _inputs()
    x1, _ = ops.sign_step(x, d, g, a, 8 / 255)
    assert "SignStep" not in _backward_name(x1)  # the reference's own autograd graph
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        ops.sign_step(x, d, g, a, 8 / 255)


def test_unknown_backend() -> None:
    x, d, g, a = _inputs()
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.sign_step(x, d, g, a, 8 / 255, backend="gpu")


def test_unavailable_backend_says_why_and_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "load", lambda name: (None, f"import apart_fast._C_{name} failed: ImportError: gone"))
    x, d, g, a = _inputs()
    with pytest.raises(RuntimeError, match=r"backend 'cpp' is unavailable: .*ImportError: gone.*pip install") as err:
        ops.sign_step(x, d, g, a, 8 / 255, backend="cpp")
    assert "\n" not in str(err.value)
    # auto falls back to the reference instead of failing
    x1, _ = ops.sign_step(x, d, g, a, 8 / 255)
    assert "SignStep" not in _backward_name(x1)


def test_backend_device_mismatch() -> None:
    x, d, g, a = _inputs()
    if dispatch.available("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' runs CUDA tensors"):
            ops.sign_step(x, d, g, a, 8 / 255, backend="cuda")


def test_mismatched_dtype_device_shape_and_step() -> None:
    x, d, g, a = _inputs()
    with pytest.raises(TypeError, match=r"sign_step: d has dtype torch.float16 but x has torch.float32.*d.to\(x.dtype\)"):
        ops.sign_step(x, d.half(), g, a, 8 / 255)
    with pytest.raises(ValueError, match="g is on meta but x is on cpu"):
        ops.sign_step(x, d, g.to("meta"), a, 8 / 255)
    with pytest.raises(ValueError, match="omega has shape"):
        ops.perturb_init(x, d[:1], a, 8 / 255)
    with pytest.raises(ValueError, match="a must hold one element"):
        ops.sign_step(x, d, g, torch.ones(2), 8 / 255)
    with pytest.raises(TypeError, match="step sizes are float32"):
        ops.layer_perturb(x, ops.pack_sign(g), torch.tensor(1, dtype=torch.int64))
    with pytest.raises(TypeError, match="a must be a one-element tensor"):
        ops.sign_step(x, d, g, 0.1, 8 / 255)
    with pytest.raises(TypeError, match="int8"):
        ops.layer_perturb(x, torch.sign(g), a)
    with pytest.raises(TypeError, match="float32, float16"):
        ops.pack_sign(torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5])
def test_eps_range(backend: str, eps: float) -> None:
    x, d, g, a = _inputs()
    with pytest.raises(ValueError, match=r"eps=.* is not in \(0, 1\]"):
        ops.sign_step(x, d, g, a, eps, backend=backend)
    with pytest.raises(ValueError, match=r"not in \(0, 1\]"):
        ops.pgd_step(x, x, g, 0.01, eps, backend=backend)


def test_cpp_kernel_checks(fused: str) -> None:
    """The compiled primitives check their own arguments (for direct callers) with one-line messages."""
    mod = dispatch.module(fused)
    x, d, g, _ = _inputs()
    with pytest.raises(RuntimeError, match="d has dtype Half but x has Float"):
        mod.sign_step_fwd(x, d.half(), g, torch.ones(1), 0.03)
    with pytest.raises(RuntimeError, match=r"d has strides .* but x has .*; pass tensors of one memory format"):
        mod.sign_step_fwd(x.transpose(2, 3), d.transpose(2, 3).contiguous(), g.transpose(2, 3), torch.ones(1), 0.03)
    with pytest.raises(RuntimeError, match=r"x with strides .* is not dense"):
        mod.sign_step_fwd(x[:, :, ::2], d[:, :, ::2], g[:, :, ::2], torch.ones(1), 0.03)
    store = torch.zeros(3, 1, 6, 6)
    idx, crop, flip = torch.tensor([0, 3]), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 3 is outside"):
        mod.omega_gather(store, idx, crop, flip, idx, 4, 4)
    with pytest.raises(RuntimeError, match="window outside"):
        mod.omega_gather(store, torch.tensor([0, 1]), torch.tensor([[0, 0], [3, 0]]), flip, idx, 4, 4)


def test_import_is_lazy() -> None:
    """Importing the ops touches neither torch.cuda nor the compiled extensions."""
    code = (
        "import sys, torch, apart_fast.ops; "
        "assert not torch.cuda.is_initialized(); "
        "assert not any(m.startswith('apart_fast._C') for m in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_report() -> None:
    out = subprocess.run([sys.executable, "-m", "apart_fast.info"], check=True, capture_output=True, text=True).stdout
    assert "auto picks: CPU tensors ->" in out and "cpp" in out


def test_function_saves_only_inputs() -> None:
    """perturb_init keeps x, omega and a_init only (no fp32 intermediates)."""
    if not dispatch.available("cpp"):
        pytest.skip("cpp extension not built")
    x, omega, _, a = _inputs()
    x0, _ = ops.perturb_init(x, omega, a, 8 / 255, backend="cpp")
    assert isinstance(x0.grad_fn, PerturbInit._backward_cls)
    saved = x0.grad_fn.saved_tensors
    assert len(saved) == 3 and saved[0] is x and saved[2] is a
