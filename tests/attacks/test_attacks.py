"""Attacks: closed-form PGD on a linear model, restarts, bounds, eval mode, no parameter grads, losses, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from apart_fast.attacks import ce_loss, cw_loss, eval_mode, evaluate, pgd_attack
from apart_fast.models import SmallCNN

EPS = 8 / 255
D = 16


def _linear_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """2-class linear model on 1x4x4 images whose weight differences are bounded away from 0."""
    g = torch.Generator().manual_seed(seed)
    diff = (torch.rand(D, generator=g) * 0.5 + 0.5) * torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0)
    w0 = torch.randn(D, generator=g) * 0.1
    w = torch.stack([w0, w0 + diff])
    b = torch.tensor([0.0, -float(diff.sum()) / 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 2))
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(b)
    return model, w, b


def _inner_images(n: int, seed: int) -> torch.Tensor:
    """Images in [2 eps, 1 - 2 eps]: the [0, 1] clamp never bites within the eps ball."""
    g = torch.Generator().manual_seed(seed)
    return 2 * EPS + torch.rand(n, 1, 4, 4, generator=g) * (1 - 4 * EPS)


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=10, in_channels=3, width=8)


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [True, False])
def test_linear_model_exact_worst_case(loss: str, random_start: bool) -> None:
    model, w, _ = _linear_model()
    x = _inner_images(64, seed=1)
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(2))
    x_adv = pgd_attack(model, x, y, eps=EPS, step=EPS / 4, steps=10, loss=loss, random_start=random_start,
                       generator=torch.Generator().manual_seed(3))
    s = torch.sign(w[y] - w[1 - y]).view(-1, 1, 4, 4)  # delta* = -eps * s
    expected = torch.where(s > 0, x - EPS, x + EPS)
    assert torch.equal(x_adv, expected)


def test_linear_model_robust_accuracy_matches_closed_form() -> None:
    model, w, b = _linear_model(seed=5)
    n = 203
    x = _inner_images(n, seed=6)
    y = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(7))
    margin = (x.flatten(1) * (w[y] - w[1 - y])).sum(1) + (b[y] - b[1 - y])
    clean = int((margin > 0).sum()) / n
    robust = int((margin - EPS * (w[y] - w[1 - y]).abs().sum(1) > 0).sum()) / n
    assert 0 < robust < clean < 1  # the check means something
    for batch_size in (7, 256):
        res = evaluate(model, x, y, batch_size=batch_size, eps=EPS, step=EPS / 4, steps=10)
        assert res["n"] == n
        assert isinstance(res["clean_acc"], float) and isinstance(res["robust_acc"], float)
        assert res["clean_acc"] == pytest.approx(clean, abs=1e-12)
        assert res["robust_acc"] == pytest.approx(robust, abs=1e-12)


def test_restarts_never_lower_success() -> None:
    model = _bn_model().eval()
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    for seed in range(2):
        for loss in ("ce", "cw"):
            a1 = pgd_attack(model, x, y, eps=EPS, step=EPS / 8, steps=1, restarts=1, loss=loss,
                            generator=torch.Generator().manual_seed(seed))
            a4 = pgd_attack(model, x, y, eps=EPS, step=EPS / 8, steps=1, restarts=4, loss=loss,
                            generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                l1, l4 = model(a1), model(a4)
            f1, f4 = l1.argmax(1) != y, l4.argmax(1) != y
            assert bool((f4 | ~f1).all()), "an example fooled with 1 restart is not fooled with 4"
            fn = ce_loss if loss == "ce" else cw_loss
            both_correct = ~f1 & ~f4
            assert bool((fn(l4, y)[both_correct] >= fn(l1, y)[both_correct] - 1e-6).all())


def test_restart_selection_is_vectorised_over_examples() -> None:
    """Different examples may keep perturbations from different restarts."""
    model = _bn_model(3).eval()
    x = torch.rand(128, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(5))
    adv = pgd_attack(model, x, y, steps=0, restarts=3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    starts = [torch.clamp(x + (2 * torch.rand(x.shape, generator=g) - 1) * EPS, 0, 1) for _ in range(3)]
    which = [(adv == s).flatten(1).all(1) for s in starts]
    assert bool(torch.stack(which).any(0).all())
    assert sum(int(w.any()) for w in which) >= 2


@settings(max_examples=25, deadline=None)
@given(
    eps=st.floats(1e-3, 1.0),
    step_frac=st.floats(0.05, 3.0),
    steps=st.integers(0, 4),
    restarts=st.integers(1, 2),
    seed=st.integers(0, 2**16),
    loss=st.sampled_from(["ce", "cw"]),
)
def test_bounds(eps: float, step_frac: float, steps: int, restarts: int, seed: int, loss: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    y = torch.randint(0, 10, (6,), generator=g)
    model = _bn_model(seed % 5)
    x_adv = pgd_attack(model, x, y, eps=eps, step=eps * step_frac, steps=steps, restarts=restarts, loss=loss,
                       generator=g)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-7
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_eval_mode_during_attack_and_restored_after() -> None:
    model = _bn_model().train()
    model.layer1.eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes_seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, a: modes_seen.append(any(s.training for s in m.modules())))
    x = torch.rand(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    pgd_attack(model, x, y, steps=3, restarts=2)
    evaluate(model, x, y, steps=2, batch_size=3)
    assert modes_seen and not any(modes_seen)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert model.training and model.layer2.training and model.head.bn.training
    assert not model.layer1.training and not model.layer1[0].bn1.training


def test_eval_mode_restores_on_error() -> None:
    model = _bn_model().train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training


def test_no_parameter_gradients() -> None:
    model = _bn_model().train()
    model.stem.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.rand(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    pgd_attack(model, x, y, steps=2)
    evaluate(model, x, y, steps=2)
    with torch.no_grad():  # the attack still needs and gets its input gradient
        adv = pgd_attack(model, x, y, steps=2, random_start=False)
    assert not torch.equal(adv, x)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_cw_loss_hand_example() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [0.0, 0.0, -2.0]])
    y = torch.tensor([1, 0, 2])
    torch.testing.assert_close(cw_loss(logits, y), torch.tensor([-1.0, -4.0, 2.0]))
    torch.testing.assert_close(ce_loss(logits, y), F.cross_entropy(logits, y, reduction="none"))


def test_evaluate_uint8_matches_float_and_clean_only() -> None:
    model = _bn_model().eval()
    xu = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (20,))
    a = evaluate(model, xu, y, batch_size=6, steps=3, seed=1)
    b = evaluate(model, xu.float() / 255, y, batch_size=6, steps=3, seed=1)
    assert a == b
    c = evaluate(model, xu, y, steps=0, progress=True)
    assert c["robust_acc"] is None and c["clean_acc"] == a["clean_acc"] and c["n"] == 20
    assert 0.0 <= a["robust_acc"] <= a["clean_acc"]


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, float("nan")])
def test_bad_eps(eps: float) -> None:
    model, x, y = _bn_model(), torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="eps") as e:
        pgd_attack(model, x, y, eps=eps)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, x, y, eps=eps)


def test_images_outside_unit_range() -> None:
    model, y = _bn_model(), torch.tensor([0, 1])
    x = torch.rand(2, 3, 8, 8)
    x[0, 0, 0, 0] = 1.5
    x[1, 0, 0, 0] = -0.25
    for fn in (pgd_attack, evaluate):
        with pytest.raises(ValueError) as e:
            fn(model, x, y)
        msg = str(e.value)
        assert "\n" not in msg and "-0.25" in msg and "1.5" in msg


def test_other_validation() -> None:
    model, x, y = _bn_model(), torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="loss"):
        pgd_attack(model, x, y, loss="hinge")
    with pytest.raises(ValueError, match="restarts"):
        pgd_attack(model, x, y, restarts=0)
    with pytest.raises(ValueError):
        pgd_attack(model, x, y[:1])
    with pytest.raises(ValueError):
        evaluate(model, x[:0], y[:0])


def test_wrong_channel_count_is_one_line_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"images have 1 channels but the model takes 3"):
        pgd_attack(model, x, y, steps=1)
