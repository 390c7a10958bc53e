"""The per-epoch probe: how strong and how PGD-like is a method's own training perturbation?

On a fixed probe batch (K training examples, no augmentation) and the current model, it compares the
method's training input ``x_m = method.perturb(batch)`` with a PGD-10 perturbation (step eps/4,
random start) and with random sign noise of size eps:

- ``probe_method_gain``: CE(x_m) - CE(x), the loss increase the training perturbation achieves;
- ``probe_pgd_gain`` / ``probe_noise_gain``: the same for PGD-10 and for random-sign noise;
- ``probe_strength_ratio``: method gain / PGD gain, the paper's "underfitting" signal (near the noise
  level ``probe_noise_ratio`` means the perturbation has decayed into noise);
- ``probe_cosine``: cosine between ``x_m - x`` and the PGD-10 perturbation, per example, averaged;
- ``probe_flip_frac`` / ``probe_pgd_flip_frac``: fraction of probe examples correct on ``x`` and wrong
  on the perturbed input.

Losses are taken in eval mode. The method's perturbation is computed as in training (train mode),
and everything it could disturb is put back afterwards: BatchNorm buffers, the global and the
method's RNG states, and the method's attributes (Free's carried perturbation). The probe therefore
leaves training bit-identical (tested). Off switch: ``run.cfg.probe = False`` or ``APART_FAST_PROBE=0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from apart_fast.attacks import eval_mode, pgd_attack
from apart_fast.data import Batch, decode_uint8

PROBE_K = 128  # largest probe batch; smaller when the training batch is smaller
PGD_STEPS = 10
PROBE_SEED = 12345  # the probe's own generators: same noise and PGD start every epoch


def probe_enabled(run: Any) -> bool:
    """False when ``run.cfg.probe`` is False or ``APART_FAST_PROBE`` is 0/false/off."""
    if os.environ.get("APART_FAST_PROBE", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return bool(getattr(run.cfg, "probe", True))


def probe_batch(run: Any) -> Batch:
    """The run's fixed probe batch, built once and cached on ``run``.

    K = min(128, batch size) examples from a seeded permutation of the training set (the datasets
    are stored class by class, so the literal first K would be a single class), centre crop
    (crop = (pad, pad), i.e. the unaugmented image) and no flip.
    """
    cached = getattr(run, "_probe_batch", None)
    if cached is not None:
        return cached
    d, dev = run.data, run.device
    n = int(d.train_x.shape[0])
    k = min(PROBE_K, int(run.cfg.batch_size), n)
    g = torch.Generator().manual_seed(PROBE_SEED)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    pad = int(run.method.info.pad)
    batch = Batch(
        x=decode_uint8(d.train_x[idx].to(dev)),
        y=d.train_y[idx].to(dev, torch.int64),
        index=idx.to(dev),
        crop=torch.full((k, 2), pad, dtype=torch.int64, device=dev),
        flip=torch.zeros(k, dtype=torch.bool, device=dev),
        valid=torch.ones(k, dtype=torch.bool, device=dev),
    )
    run._probe_batch = batch
    return batch


@contextmanager
def no_side_effects(run: Any) -> Iterator[None]:
    """Restore the model's buffers and parameters, RNG states and the method's attributes on exit."""
    model, method = run.model, run.method
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    training = [(m, m.training) for m in model.modules()]
    attrs = dict(vars(method))
    gen_state = method.generator.get_state()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(params[k])
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        for m, t in training:
            m.training = t
        for k in list(vars(method)):
            if k not in attrs:
                delattr(method, k)
        for k, v in attrs.items():
            setattr(method, k, v)
        method.generator.set_state(gen_state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _ce_and_correct(model: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example CE and correctness, eval mode, no grad."""
    with torch.no_grad(), eval_mode(model):
        logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y


def _ratio(a: float, b: float) -> float:
    return a / b if b > 1e-12 else 0.0


def epoch_probe(run: Any) -> dict[str, float]:
    """The probe values for the run's current model (empty when the probe is off)."""
    if not probe_enabled(run):
        return {}
    batch = probe_batch(run)
    x, y, eps = batch.x, batch.y, float(run.cfg.eps)
    model = run.model
    with no_side_effects(run):
        model.train()  # the method perturbs as it does in training
        x_m = run.method.perturb(batch).detach()
        g = torch.Generator(device=run.device).manual_seed(PROBE_SEED)
        x_p = pgd_attack(model, x, y, eps=eps, step=eps / 4, steps=PGD_STEPS, random_start=True, generator=g,
                         backend=run.cfg.backend).detach()
        sign = torch.rand(x.shape, generator=g, device=run.device) < 0.5
        x_n = torch.clamp(x + torch.where(sign, eps, -eps), 0.0, 1.0)
        ce_x, ok_x = _ce_and_correct(model, x, y)
        ce_m, ok_m = _ce_and_correct(model, x_m, y)
        ce_p, ok_p = _ce_and_correct(model, x_p, y)
        ce_n, _ = _ce_and_correct(model, x_n, y)
    k = x.shape[0]
    d_m, d_p = (x_m - x).flatten(1), (x_p - x).flatten(1)
    cos = F.cosine_similarity(d_m, d_p, dim=1, eps=1e-12)
    gains = [float((c - ce_x).mean()) for c in (ce_m, ce_p, ce_n)]
    return {
        "probe_clean_loss": float(ce_x.mean()),
        "probe_method_gain": gains[0],
        "probe_pgd_gain": gains[1],
        "probe_noise_gain": gains[2],
        "probe_strength_ratio": _ratio(gains[0], gains[1]),
        "probe_noise_ratio": _ratio(gains[2], gains[1]),
        "probe_cosine": float(cos.mean()),
        "probe_linf": float(d_m.abs().amax(1).mean()),
        "probe_flip_frac": float((ok_x & ~ok_m).sum()) / k,
        "probe_pgd_flip_frac": float((ok_x & ~ok_p).sum()) / k,
    }
