"""The CUDA extension: built when nvcc is present (importing the .so needs no GPU); kernels on CUDA tensors (gpu)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from ops_testutil import DTYPES, assert_exact, assert_reduction, randn

from apart_fast import ops
from apart_fast.ops import dispatch
from apart_fast.ops import reference as R


def _nvcc_present() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


@pytest.mark.skipif(not _nvcc_present() or torch.version.cuda is None or os.environ.get("APART_FAST_NO_CUDA") == "1",
                    reason="no nvcc (CUDA_HOME) or a CPU-only torch: the CUDA extension is not expected")
def test_cuda_extension_built() -> None:
    mod = importlib.import_module("apart_fast._C_cuda")
    assert all(hasattr(mod, p) for p in dispatch.PRIMITIVES)
    assert dispatch.available("cuda"), dispatch.unavailable_reason("cuda")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU_DTYPES = [t for t in DTYPES if t != torch.float64]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [1, 1023, 4100, 1 << 20])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_elementwise_ops(dtype, n: int) -> None:
    """sign_step (forward, gradients), perturb_init, pack_sign, layer_perturb, pgd_step on CUDA tensors."""
    dev, eps = "cuda", 8 / 255
    x = torch.rand(n, device=dev).to(dtype)
    x[::7] = 1.0
    d = ((torch.rand(n, device=dev) * 2 - 1) * 0.05).to(dtype)
    g = randn((n,), dtype, 1).to(dev)
    go = randn((n,), dtype, 2, 0.0).to(dev)
    res = []
    for fn in (lambda *t: ops.sign_step(*t, backend="cuda"), R.sign_step):
        xl, dl, al = _leaf(x), _leaf(d), torch.tensor(0.01, device=dev, requires_grad=True)
        out = fn(xl, dl, g, al, eps)
        res.append((out, torch.autograd.grad(out, [xl, dl, al], [go, go])))
    (o, gr), (ro, rgr) = res
    for u, v, what in zip(o + gr[:2], ro + rgr[:2], ["x1", "d1", "dL/dx", "dL/dd"]):
        assert_exact(u, v, what)
    x64, d64, a64 = _leaf(x.double()), _leaf(d.double()), torch.tensor(0.01, dtype=torch.float64, device=dev,
                                                                       requires_grad=True)
    _, gd64, ga64 = torch.autograd.grad(R.sign_step(x64, d64, g.double(), a64, eps), [x64, d64, a64],
                                        [go.double(), go.double()])
    assert_reduction(gr[2], rgr[2], ga64, n, gd64.abs().sum().item(), dtype)
    omega = (torch.rand(n, device=dev) * 2 - 1).to(dtype)
    a = torch.tensor(0.05, device=dev)
    for u, v in zip(ops.perturb_init(x, omega, a, eps, backend="cuda"), R.perturb_init(x, omega, a, eps)):
        assert_exact(u, v, "perturb_init")
    s = ops.pack_sign(g, backend="cuda")
    assert_exact(s, R.pack_sign(g), "sign")
    assert_exact(ops.layer_perturb(x, s, a, backend="cuda"), R.layer_perturb(x, s, a), "layer")
    assert_exact(ops.pgd_step(x, x, g, 2 / 255, eps, backend="cuda"), R.pgd_step(x, x, g, 2 / 255, eps), "pgd")


@pytest.mark.gpu
@needs_gpu
def test_cuda_omega_and_graph_capture() -> None:
    dev = "cuda"
    store = torch.rand(20, 3, 40, 40, device=dev) * 2 - 1
    index = torch.tensor([3, 7, 3, 19, 0], device=dev)
    crop = torch.randint(9, (5, 2), device=dev)
    flip = torch.rand(5, device=dev) < 0.5
    g = torch.randn(5, 3, 32, 32, device=dev)
    assert_exact(ops.omega_gather(store, index, crop, flip, (32, 32), backend="cuda"),
                 R.omega_gather(store, index, crop, flip, (32, 32)), "gather")
    ours, ref = store.clone(), store.clone()
    ratio = torch.tensor(0.5, device=dev)
    ops.omega_update(ours, index, crop, flip, g, ratio, backend="cuda")
    R.omega_update(ref, index, crop, flip, g, ratio)
    assert_exact(ours, ref, "store")
    # no host sync: the update and a sign step capture into a CUDA graph
    x = torch.rand(5, 3, 32, 32, device=dev)
    a = torch.tensor(0.01, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.omega_update(ours, index, crop, flip, g, ratio, backend="cuda")
        ops.sign_step(x, x * 0, g, a, 8 / 255, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.omega_update(ours, index, crop, flip, g, ratio, backend="cuda")
        ops.sign_step(x, x * 0, g, a, 8 / 255, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rounds", ["down", "up"])
@pytest.mark.parametrize("a_shape", [(), (1,)], ids=["0d", "1elem"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_step_shape_conventions_where_eps_binds(dtype, a_shape, rounds, backend) -> None:
    """On CUDA the reference's clamp forward keeps a Python-scalar eps in fp32 but autograd's masks compare in the
    clamped tensor's dtype (bf16(8/255) = 0.031494 > 8/255; fp16 rounds below), and a (1,) step size computes in
    fp32: both backends match it where elements land exactly on eps rounded to the dtype, from below and above."""
    if not dispatch.available(backend):
        pytest.skip(dispatch.unavailable_reason(backend))
    from test_ops import check_landing

    check_landing(backend, dtype, a_shape, device="cuda", rounds=rounds)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_pgd_projection_binds(dtype) -> None:
    """x_adv = x, a step of 2 eps: every moved element lands on x -+ eps, formed with eps in fp32 as on CUDA."""
    x = (torch.rand(4, 3, 9, 11, device="cuda") * 0.9 + 0.05).to(dtype)
    g = randn(x.shape, dtype, 3).cuda()
    eps = 8 / 255
    assert_exact(ops.pgd_step(x, x, g, 2 * eps, eps, backend="cuda"), R.pgd_step(x, x, g, 2 * eps, eps), "pgd")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_channels_last_matches_nchw(backend: str) -> None:
    """channels_last CUDA tensors run as they are on the CUDA extension and Triton: NCHW's values, channels_last out."""
    if not dispatch.available(backend):
        pytest.skip(dispatch.unavailable_reason(backend))
    from test_layout import _cl, _is_cl, _leaf, _run_all

    shape, eps = (3, 5, 6, 7), 8 / 255
    x, d = torch.rand(shape, device="cuda"), (torch.rand(shape, device="cuda") * 2 - 1) * eps
    g, omega, go = torch.randn(shape, device="cuda"), torch.rand(shape, device="cuda") * 2 - 1, torch.randn(shape, device="cuda")
    a = torch.tensor(0.05, device="cuda")
    want = _run_all(backend, _leaf(x), _leaf(d), g, omega, go, _leaf(a))
    got = _run_all(backend, _leaf(_cl(x)), _leaf(_cl(d)), _cl(g), _cl(omega), _cl(go), _leaf(a))
    for u, v in zip(got, want):
        if u.dim() == 4:
            assert _is_cl(u)
            assert_exact(u.contiguous(), v.contiguous(), "channels_last")
        else:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
