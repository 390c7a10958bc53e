"""L-inf PGD attack and robust evaluation (the paper's PGD-20, step 2/255, random start, eval mode).

The attack takes input gradients only (``torch.autograd.grad(loss, x_adv)``): parameters' ``.grad``
are never touched, so it is safe to call in the middle of training. Each step is
``apart_fast.ops.pgd_step``, whose fused kernels replace the reference behind the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast import ops

LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example (shape ``(B,)``); the attack sums it for the gradient."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin per example: ``max_{j != y} z_j - z_y`` (positive iff misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    own = F.one_hot(y, logits.shape[1]).bool()
    z_other = logits.masked_fill(own, float("-inf")).amax(dim=1)
    return z_other - z_y


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_loss}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block; restore every submodule's own train/eval flag after."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in states:
            m.training = training


def _loss_fn(loss: str) -> LossFn:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[loss]


def _check_attack_args(eps: float, step: float, steps: int, restarts: int, loss: str) -> None:
    """One-line ValueErrors for attack settings that make no sense."""
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1] (images are in [0, 1]), got {eps}")
    if not step > 0.0:
        raise ValueError(f"step must be positive, got {step}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    _loss_fn(loss)


def _check_images(x: Tensor, y: Tensor) -> None:
    """Float images in [0, 1] with one integer label each; one-line ValueError naming what was seen."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor in [0, 1] here, got dtype {x.dtype}")
    if x.ndim < 2 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x (N, ...) and y (N,) must agree, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x must be in [0, 1], observed min {lo:.6g} and max {hi:.6g} (scale uint8 images by 1/255)")


def expected_channels(model: nn.Module) -> int | None:
    """Input channels ``model`` takes: from ``model.config`` when built here, else its first Conv2d."""
    kwargs = getattr(model, "config", {}).get("kwargs", {}) if isinstance(getattr(model, "config", None), dict) else {}
    if "in_channels" in kwargs:
        return int(kwargs["in_channels"])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _check_channels(model: nn.Module, x: Tensor) -> None:
    """One-line ValueError when images have another channel count than the model's input."""
    want = expected_channels(model)
    if want is not None and x.ndim == 4 and x.shape[1] != want:
        raise ValueError(
            f"images have {x.shape[1]} channels but the model takes {want}; pass images shaped (N, {want}, H, W)"
        )


def _random_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """``clamp(x + U[-eps, eps], 0, 1)``; noise drawn on the generator's device, then moved to ``x``'s."""
    dev = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    return torch.clamp(x + (2.0 * u - 1.0) * eps, 0.0, 1.0)


def _pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step: float,
    steps: int,
    restarts: int,
    loss_fn: LossFn,
    random_start: bool,
    generator: torch.Generator | None,
    backend: str,
) -> Tensor:
    """Unchecked PGD core; the model is assumed to be in eval mode already."""
    x = x.detach()
    best = x.clone()
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    for _ in range(restarts):
        x_adv = _random_start(x, eps, generator) if random_start else x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                total = loss_fn(model(x_adv), y).sum()
                (g,) = torch.autograd.grad(total, x_adv)
            x_adv = ops.pgd_step(x_adv.detach(), x, g, step, eps, backend=backend).detach()
        with torch.no_grad():
            logits = model(x_adv)
            cur_loss = loss_fn(logits, y).to(best_loss.dtype)
            fooled = logits.argmax(dim=1) != y
        # Keep a misclassifying perturbation once found; among non-misclassifying ones, the highest loss.
        better = (fooled & ~best_fooled) | (~fooled & ~best_fooled & (cur_loss > best_loss))
        best = torch.where(better.view(bshape), x_adv, best)
        best_loss = torch.where(better, cur_loss, best_loss)
        best_fooled = best_fooled | fooled
    return best


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 20,
    restarts: int = 1,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """L-inf PGD on a batch: returns ``x_adv`` with ``|x_adv - x| <= eps`` and ``x_adv`` in [0, 1].

    Random start ``U[-eps, eps]`` (then clamped to [0, 1]), ``steps`` sign steps of size ``step`` via
    ``ops.pgd_step``. Over ``restarts``, each example keeps the first perturbation that misclassifies
    it, else the one with the highest loss. Runs in eval mode (previous modes restored) and takes
    input gradients only, so parameters' ``.grad`` and ``requires_grad`` are left as they were.
    """
    _check_attack_args(eps, step, steps, restarts, loss)
    _check_images(x, y)
    _check_channels(model, x)
    with eval_mode(model):
        return _pgd(model, x, y, eps, step, steps, restarts, _loss_fn(loss), random_start, generator, backend)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 20,
    restarts: int = 1,
    loss: str = "ce",
    device: torch.device | str | None = None,
    progress: bool = False,
    seed: int = 0,
    backend: str = "auto",
) -> dict[str, Any]:
    """Clean and PGD accuracy of ``model`` on ``(x, y)``, batch by batch, in eval mode.

    ``x`` is uint8 (N, C, H, W) (scaled by 1/255 per batch on the device) or float in [0, 1].
    ``device`` defaults to the model's; the model itself is not moved. ``steps=0`` evaluates clean
    accuracy only (``robust_acc`` is None). Returns ``{"clean_acc": float, "robust_acc": float | None, "n": int}``.
    The random starts come from a generator seeded with ``seed``, so results are reproducible.
    """
    if steps > 0:
        _check_attack_args(eps, step, steps, restarts, loss)
    elif steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on an empty set (x has 0 examples)")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"x (N, ...) and y (N,) must agree, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    _check_channels(model, x)
    is_uint8 = x.dtype == torch.uint8
    if not is_uint8:
        _check_images(x, y)
    dev = torch.device(device) if device is not None else _model_device(model)
    loss_fn = _loss_fn(loss)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)

    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=(n + batch_size - 1) // batch_size, desc="evaluate", unit="batch")
    clean = torch.zeros((), dtype=torch.long, device=dev)
    robust = torch.zeros((), dtype=torch.long, device=dev)
    with eval_mode(model):
        for i in starts:
            xb = x[i : i + batch_size].to(dev, non_blocking=True)
            xb = xb.float().div_(255.0) if is_uint8 else xb.detach()
            yb = y[i : i + batch_size].to(dev, non_blocking=True).long()
            with torch.no_grad():
                clean += (model(xb).argmax(dim=1) == yb).sum()
            if steps > 0:
                x_adv = _pgd(model, xb, yb, eps, step, steps, restarts, loss_fn, True, gen, backend)
                with torch.no_grad():
                    robust += (model(x_adv).argmax(dim=1) == yb).sum()
    return {
        "clean_acc": clean.item() / n,
        "robust_acc": robust.item() / n if steps > 0 else None,
        "n": n,
    }


__all__ = ["LOSSES", "ce_loss", "cw_loss", "eval_mode", "evaluate", "pgd_attack"]
