"""AutoAttack (Croce and Hein, 2020; standard version, L-inf) through ``torchattacks``, the ``[eval]`` extra.

The attacks themselves (APGD-CE, APGD-T, FAB-T, Square) are torchattacks' (3.5.x); this module only
runs them the way the project evaluates: in eval mode (each submodule's flag restored after), on
float images in [0, 1] (the models normalise inside), batch by batch on the model's device, with a
fixed seed. Three things torchattacks does that a caller would not expect are undone here:

- its white-box attacks run 10 iterations by default (torchattacks issue #196); the official
  standard version runs 100, which is ``steps``'s default here (``steps=10`` reproduces a plain
  ``torchattacks.AutoAttack`` call exactly);
- every sub-attack calls ``torch.manual_seed(seed)`` on the global generator: the caller's RNG
  state is saved and restored around the attack;
- FAB calls ``.backward()``, which would fill parameters' ``.grad``: parameters are frozen
  (``requires_grad=False``) during the attack and their flags restored after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from apart_fast.attacks.pgd import _check_channels, _check_images, _model_device, eval_mode

INSTALL = "pip install 'apart_fast[eval]' (or: pip install torchattacks==3.5.1)"
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
SQUARE_QUERIES = 5000  # the standard version's Square budget


class MissingExtraError(ImportError):
    """An optional dependency (an ``apart_fast[...]`` extra) is not installed; the message names the install command."""


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError:
        raise MissingExtraError(f"AutoAttack needs torchattacks, which is not installed: {INSTALL}") from None
    return torchattacks


def torchattacks_version() -> str | None:
    """The installed torchattacks version, or None when it is missing."""
    try:
        return _torchattacks().__version__
    except MissingExtraError:
        return None


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block no parameter requires grad (input gradients still flow); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """The global CPU (and ``device``'s CUDA) RNG state is the same after the block as before it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def num_classes(model: nn.Module, x: Tensor) -> int:
    """Classes the model predicts: ``model.config``'s ``num_classes`` when built here, else one forward pass."""
    kwargs = model.config.get("kwargs", {}) if isinstance(getattr(model, "config", None), dict) else {}
    if "num_classes" in kwargs:
        return int(kwargs["num_classes"])
    with torch.no_grad(), eval_mode(model):
        return int(model(x[:1]).shape[1])


def _check(eps: float, steps: int, seed: int, square_queries: int, attacks: tuple[str, ...]) -> None:
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1] (images are in [0, 1]), got {eps}")
    if steps < 1:
        raise ValueError(f"AutoAttack steps must be >= 1 (the standard version uses 100), got {steps}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if square_queries < 1:
        raise ValueError(f"square_queries must be >= 1 (the standard version uses {SQUARE_QUERIES}), got {square_queries}")
    bad = [a for a in attacks if a not in STANDARD]
    if bad or not attacks:
        raise ValueError(f"attacks {bad or list(attacks)} unknown; choose from {', '.join(STANDARD)}")


def build(model: nn.Module, *, eps: float, n_classes: int, steps: int = 100, seed: int = 0,
          square_queries: int = SQUARE_QUERIES, attacks: tuple[str, ...] = STANDARD) -> Any:
    """torchattacks' standard L-inf AutoAttack on ``model`` with ``steps`` iterations per white-box attack.

    ``attacks`` keeps a subset of the four (in the standard order; one alone is that torchattacks
    attack, e.g. ``("square",)`` for the black-box check). Returns a callable ``atk(x, y) -> x_adv``.
    """
    _check(eps, steps, seed, square_queries, attacks)
    ta = _torchattacks()
    aa = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    subs = aa._autoattack.attacks  # APGD(ce), APGDT, FAB(multi-targeted), Square: torchattacks 3.5's order
    for sub in subs[:3]:
        sub.steps = steps
    subs[3].n_queries = square_queries
    keep = [sub for name, sub in zip(STANDARD, subs) if name in attacks]
    if len(keep) == len(STANDARD):
        return aa
    if len(keep) == 1:
        return keep[0]
    return ta.MultiAttack(keep)


def settings(eps: float, n_classes: int, steps: int, seed: int, square_queries: int,
             attacks: tuple[str, ...] = STANDARD) -> dict[str, Any]:
    """The attack's exact settings, for the JSON report."""
    return {"attack": "AutoAttack", "version": "standard" if attacks == STANDARD else "custom", "norm": "Linf",
            "eps": eps, "attacks": list(attacks), "apgd_steps": steps, "apgd_restarts": 1,
            "target_classes": n_classes - 1, "square_queries": square_queries, "seed": seed,
            "library": f"torchattacks {torchattacks_version()}"}


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, *, steps: int = 100, seed: int = 0,
               batch_size: int = 256, n_classes: int | None = None, square_queries: int = SQUARE_QUERIES,
               attacks: tuple[str, ...] = STANDARD, progress: bool = False) -> Tensor:
    """Standard L-inf AutoAttack on ``(x, y)``: returns ``x_adv`` (same device as ``x``) with ``|x_adv - x| <= eps``.

    ``x`` is float in [0, 1] or uint8; batches of ``batch_size`` run on the model's device, in eval
    mode, each with the same ``seed``. The caller's RNG state and parameters' ``.grad`` are left as they were.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    xf = x.float().div(255.0) if x.dtype == torch.uint8 else x
    _check_images(xf, y)
    _check_channels(model, xf)
    dev = _model_device(model)
    k = n_classes if n_classes is not None else num_classes(model, xf[:1].to(dev))
    atk = build(model, eps=eps, n_classes=k, steps=steps, seed=seed, square_queries=square_queries, attacks=attacks)
    out = torch.empty_like(xf)
    starts = range(0, int(xf.shape[0]), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="AutoAttack", unit="batch", disable=None)  # None: no bar without a terminal
    with eval_mode(model), frozen_parameters(model), isolated_rng(dev):
        for i in starts:
            xb = xf[i : i + batch_size].to(dev).detach()
            yb = y[i : i + batch_size].to(dev).long()
            adv = atk(xb, yb).detach()
            # torchattacks projects onto the ball; guard against its float rounding at the boundary
            adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp_(0.0, 1.0)
            out[i : i + batch_size] = adv.to(out.device)
    return out


def evaluate_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, *, steps: int = 100,
                        seed: int = 0, batch_size: int = 256, square_queries: int = SQUARE_QUERIES,
                        attacks: tuple[str, ...] = STANDARD, progress: bool = False) -> dict[str, Any]:
    """Clean and AutoAttack accuracy of ``model`` on ``(x, y)`` with the attack's exact settings.

    Returns ``{"clean_acc", "robust_acc", "n", "settings"}``; a point counts as robust only if its
    adversarial example is still classified correctly (misclassified clean points are never attacked).
    """
    if int(x.shape[0]) == 0:
        raise ValueError("cannot evaluate on an empty set (x has 0 examples)")
    dev = _model_device(model)
    xf = x.float().div(255.0) if x.dtype == torch.uint8 else x
    k = num_classes(model, xf[:1].to(dev))
    adv = autoattack(model, xf, y, eps, steps=steps, seed=seed, batch_size=batch_size, n_classes=k,
                     square_queries=square_queries, attacks=attacks, progress=progress)
    clean = robust = 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, int(xf.shape[0]), batch_size):
            yb = y[i : i + batch_size].to(dev)
            clean += int((model(xf[i : i + batch_size].to(dev)).argmax(1) == yb).sum())
            robust += int((model(adv[i : i + batch_size].to(dev)).argmax(1) == yb).sum())
    n = int(xf.shape[0])
    return {"clean_acc": clean / n, "robust_acc": robust / n, "n": n,
            "settings": settings(eps, k, steps, seed, square_queries, attacks)}


__all__ = ["INSTALL", "MissingExtraError", "STANDARD", "autoattack", "build", "evaluate_autoattack",
           "frozen_parameters", "isolated_rng", "settings", "torchattacks_version"]
