"""torch.library registration: the ops compile with ``torch.compile(fullgraph=True)`` and match eager.

The compiled backends appear in the graph as the custom ops ``torch.ops.apart_fast.*`` (fake kernels for
shapes, registered autograd whose backward is another custom op); the reference compiles as plain PyTorch.
"""

from __future__ import annotations

import pytest
import torch
from ops_testutil import BACKENDS_CPU, FUSED_CPU, assert_exact

from apart_fast import ops
from apart_fast.ops import functions

EPS = 8 / 255


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 8, 8, generator=g)
    d = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    grad = torch.randn(x.shape, generator=g)
    h = torch.randn(2, 4, 8, 8, generator=g)
    gh = torch.randn(h.shape, generator=g)
    return x, d, grad, h, gh


def _step_and_layer(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                    gh: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """A pass-2 fragment: one sign step on the input, one layer perturbation, a scalar loss."""
    x1, d1 = ops.sign_step(x, d, g, a, EPS, backend=backend)
    s = ops.pack_sign(gh, backend=backend)
    out = ops.layer_perturb(h, s, b, backend=backend)
    return (x1 * x1).sum() + d1.sum() + (out * h.detach()).sum()


def _run(fn, backend: str):
    x, d, g, h, gh = _data()
    xl, dl, hl = x.clone().requires_grad_(), d.clone().requires_grad_(), h.clone().requires_grad_()
    a, b = torch.tensor(0.01, requires_grad=True), torch.tensor(0.02, requires_grad=True)
    loss = fn(xl, dl, g, a, hl, gh, b, backend)
    return loss, torch.autograd.grad(loss, [xl, dl, a, hl, b])


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_compile_fullgraph_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_step_and_layer, fullgraph=True)
    loss_c, grads_c = _run(compiled, backend)
    loss_e, grads_e = _run(_step_and_layer, backend)
    # the loss and the step-size gradients are sums, which inductor may reorder; elementwise gradients are exact
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for name, gc, ge in zip(["dL/dx", "dL/dd", "dL/da", "dL/dh", "dL/db"], grads_c, grads_e):
        if name in ("dL/da", "dL/db"):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert_exact(gc, ge, name)


@pytest.mark.parametrize("backend", FUSED_CPU or [pytest.param("cpp", marks=pytest.mark.skip(reason="cpp not built"))])
def test_custom_ops_in_the_graph(backend: str) -> None:
    """Dynamo keeps each fused op as one ``apart_fast`` custom op node (no graph break, no inlining)."""
    seen: list[str] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    x, d, g, h, gh = _data()
    a, b = torch.tensor(0.01), torch.tensor(0.02)
    torch.compile(_step_and_layer, backend=record, fullgraph=True)(x, d, g, a, h, gh, b, backend)
    for op in ("sign_step", "pack_sign", "layer_perturb"):
        assert any(f"apart_fast.{op}" in t for t in seen), (op, seen)


@pytest.mark.parametrize("backend", FUSED_CPU or [pytest.param("cpp", marks=pytest.mark.skip(reason="cpp not built"))])
def test_registered_ops_pass_opcheck(backend: str) -> None:
    """Schema, fake kernels and registered autograd of every custom op (torch.library.opcheck)."""
    x, d, g, h, gh = _data()
    a = torch.tensor(0.01, requires_grad=True)
    xl, dl = x.clone().requires_grad_(), d.clone().requires_grad_()
    s = ops.pack_sign(gh, backend=backend)
    store = torch.rand(4, 3, 12, 12)
    index, crop, flip = torch.tensor([2, 0]), torch.tensor([[1, 3], [4, 0]]), torch.tensor([True, False])
    src = torch.tensor([0, 1])
    cases = [
        (functions.sign_step_op, (xl, dl, g, a, EPS, backend)),
        (functions.perturb_init_op, (xl, (d / EPS).detach(), a, EPS, backend)),
        (functions.layer_perturb_op, (h.clone().requires_grad_(), s, a, backend)),
        (functions.pack_sign_op, (gh, backend)),
        (functions.pgd_step_op, (x, x, g, 2 / 255, EPS, backend)),
        (functions.omega_gather_op, (store, index, crop, flip, src, 8, 8, backend)),
        (functions.omega_update_op, (store, index, crop, flip, src, torch.randn(2, 3, 8, 8), torch.tensor([0.5]),
                                     backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_custom_op_outputs_match_the_public_api() -> None:
    """Calling ``torch.ops.apart_fast.sign_step`` directly (registered autograd) gives the public op's results."""
    if not FUSED_CPU:
        pytest.skip("cpp extension not built")
    x, d, g, _, _ = _data()
    go = torch.randn(x.shape)
    res = []
    for call in (lambda *t: torch.ops.apart_fast.sign_step(*t, "cpp"), lambda *t: ops.sign_step(*t, backend="cpp")):
        xl, dl, a = x.clone().requires_grad_(), d.clone().requires_grad_(), torch.tensor(0.01, requires_grad=True)
        out = call(xl, dl, g, a, EPS)
        res.append((out, torch.autograd.grad(out, [xl, dl, a], [go, go])))
    for u, v, what in zip(res[0][0] + res[0][1], res[1][0] + res[1][1], ["x1", "d1", "dL/dx", "dL/dd", "dL/da"]):
        assert_exact(u, v, what)
