"""N-FGSM's perturbation has the paper's distribution and size; GradAlign's regulariser is the mean gradient
cosine, and its double-backpropagated parameter gradient matches finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apart_fast.config import Config, ConfigError
from apart_fast.methods.gradalign import alignment


def _interior(x: torch.Tensor, margin: float) -> torch.Tensor:
    """Pixels far enough from 0 and 1 that neither the noise nor the step is clipped."""
    return (x > margin) & (x < 1 - margin)


@pytest.mark.parametrize(("k", "step"), [(2.0, None), (4.0, 4 / 255)])
def test_nfgsm_noise_is_uniform_k_eps_and_the_step_is_one_unprojected_sign_step(k, step, images, make):
    x, y = images
    x = x.repeat(8, 1, 1, 1)  # 192 images: enough pixels for the distribution checks
    y = y.repeat(8)
    method, loader = make("nfgsm", x, y, nfgsm_k=k, nfgsm_step=step)
    eps = method.cfg.eps
    size = eps if step is None else step
    batch = next(iter(loader))
    state = method.generator.get_state()
    x_adv = method.perturb(batch)
    method.generator.set_state(state)  # replay the same noise draw
    x0 = method.uniform_start(batch.x, k * eps)
    inside = _interior(batch.x, k * eps + size)
    noise, move = (x0 - batch.x)[inside], (x_adv - x0)[inside]
    # U(-k eps, k eps): bounds, mean, spread, and a quarter of the draws in each quarter of the interval
    assert noise.abs().max() <= k * eps * (1 + 1e-5) and noise.abs().max() > 0.99 * k * eps
    assert abs(float(noise.mean())) < 0.02 * k * eps
    assert abs(float(noise.std()) - k * eps / 3 ** 0.5) < 0.02 * k * eps
    counts = torch.histc(noise, bins=4, min=-k * eps, max=k * eps) / noise.numel()
    torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.02, rtol=0)
    # one sign step of the configured size along the input gradient at the noisy start
    g = method.input_grad(x0, batch.y)[inside]
    nz = g != 0
    torch.testing.assert_close(move[nz], size * torch.sign(g[nz]), atol=1e-6, rtol=0)
    # no projection back to the eps-ball: for k = 2 and step eps about half the pixels end outside it
    d = (x_adv - batch.x)
    assert d.abs().max() <= method.linf_bound + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    if k == 2.0 and step is None:
        frac = float((d[inside].abs() > eps + 1e-6).float().mean())
        assert 0.45 < frac < 0.55


def test_nfgsm_and_gradalign_flags_are_checked():
    for kw, flag in (({"nfgsm_k": 0.0}, "--nfgsm-k"), ({"nfgsm_step": -1.0}, "--nfgsm-step"),
                     ({"gradalign_lambda": -0.1}, "--gradalign-lambda")):
        with pytest.raises(ConfigError, match=flag):
            Config(**kw).validate()


def test_alignment_is_the_mean_cosine_over_non_zero_gradients():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    a[1] = 0  # left out of the mean, as in the paper
    b[4] = 0
    keep = [0, 2, 3, 5]
    want = F.cosine_similarity(a[keep].flatten(1), b[keep].flatten(1), dim=1).mean()
    torch.testing.assert_close(alignment(a, b), want)
    torch.testing.assert_close(alignment(a[keep], 3.0 * a[keep]), torch.tensor(1.0))
    torch.testing.assert_close(alignment(a[keep], -a[keep]), torch.tensor(-1.0))
    assert float(alignment(torch.zeros(2, 3), torch.ones(2, 3))) == 0.0


def test_gradalign_double_backprop_matches_finite_differences(images, make):
    """d(regulariser)/d(params) through the noisy-input gradient (float64, eval mode so BatchNorm is fixed;
    the clean gradient held constant, as the method and the paper do)."""
    x, y = images
    method, loader = make("gradalign", x, y, dtype=torch.float64, gradalign_lambda=0.5)
    model = method.model.eval()
    batch = next(iter(loader))
    xb = batch.x.double()
    g_clean = method.input_grad(xb, batch.y).detach()
    method.input_grad = lambda *_: g_clean  # type: ignore[method-assign]
    state = method.generator.get_state()

    def reg() -> torch.Tensor:
        method.generator.set_state(state)  # the same noise every evaluation
        return method.regularizer(xb, batch.y)

    params = list(model.parameters())
    grads = torch.autograd.grad(reg(), params, allow_unused=True)
    torch.manual_seed(1)
    v = [torch.randn_like(p) for p in params]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, v) if g is not None)
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(h * d)
    up = float(reg().detach())
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * h * d)
    down = float(reg().detach())
    assert abs(analytic) > 1e-6  # the regulariser really depends on the parameters
    assert abs((up - down) / (2 * h) - analytic) < 1e-5 * max(1.0, abs(analytic))


def test_gradalign_step_takes_the_regulariser_into_the_update(images, make):
    """With lambda > 0 the update differs from lambda = 0 from the same state (the regulariser's gradient is applied)."""
    x, y = images
    after = []
    for lam in (0.0, 5.0):
        method, loader = make("gradalign", x, y, gradalign_lambda=lam)
        method.schedule.t = 50  # peak learning rate
        method.schedule.step()
        method.step(next(iter(loader)))
        after.append([p.detach().clone() for p in method.model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(*after))


def test_demo_runs_the_competitors_with_the_average(capsys):
    from apart_fast.cli import main

    assert main(["demo", "--epochs", "1", "--methods", "nfgsm,gradalign", "--ema", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "| nfgsm |" in out and "| gradalign |" in out and "EMA PGD-20 acc" in out
