"""Pure-PyTorch definitions of every perturbation op: the source of truth for kernels, tests and benchmarks.

Gradients come from PyTorch autograd on these formulas: ``clamp`` blocks the gradient outside its
range, and at exactly a bound follows the installed PyTorch (2.14 passes none there with scalar
bounds; older releases passed it), which the kernels detect once and match. ``sign(0) == 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def perturb_init(x: Tensor, omega: Tensor, a_init: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """APART initialisation: ``d0 = clamp(a_init*omega, -eps, eps)``, ``x0 = clamp(x + d0, 0, 1)``."""
    d0 = torch.clamp(a_init * omega, -eps, eps).to(x.dtype)
    x0 = torch.clamp(x + d0, 0.0, 1.0)
    return x0, d0


def sign_step(x: Tensor, d: Tensor, g: Tensor, a: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One learnable sign step: ``d1 = clamp(d + a*sign(g), -eps, eps)``, ``x1 = clamp(x + d1, 0, 1)``."""
    d1 = torch.clamp(d + a * torch.sign(g).to(d.dtype), -eps, eps).to(x.dtype)
    x1 = torch.clamp(x + d1, 0.0, 1.0)
    return x1, d1


def pack_sign(g: Tensor) -> Tensor:
    """The sign of ``g`` as int8 (-1, 0, 1): a quarter of the memory of an fp32 gradient."""
    return torch.sign(g).to(torch.int8)


def layer_perturb(h: Tensor, s: Tensor, a: Tensor) -> Tensor:
    """Layer-wise perturbation of pass 2: ``h + a * s`` with ``s`` the stored sign of pass 1."""
    return h + (a * s.to(h.dtype)).to(h.dtype)


def first_position(index: Tensor) -> Tensor:
    """For each batch slot, the slot where its example index first appears in the batch.

    Device-only (no host sync): a B x B comparison; argmax returns the first maximal position.
    """
    return torch.argmax((index[:, None] == index[None, :]).to(torch.uint8), dim=1)


def _window(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, size: tuple[int, int]):
    """Advanced-index tensors selecting each example's crop window (flip applied) in the store."""
    h, w = size
    dev = store.device
    rows = crop[:, 0:1].long() + torch.arange(h, device=dev)[None, :]
    cols = crop[:, 1:2].long() + torch.arange(w, device=dev)[None, :]
    cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
    ch = torch.arange(store.shape[1], device=dev)
    return (
        index.long()[:, None, None, None],
        ch[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    )


def omega_gather(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, size: tuple[int, int]) -> Tensor:
    """Each example's initialisation in image frame: its store row, cropped at ``crop`` (dy, dx), then flipped.

    ``store`` is (N, C, H+2p, W+2p); ``index`` (B,), ``crop`` (B, 2) int, ``flip`` (B,) bool; returns (B, C, H, W).
    """
    return store[_window(store, index, crop, flip, size)]


def omega_update(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, g: Tensor, ratio: Tensor | float) -> None:
    """In place: ``omega <- clamp(omega + ratio*sign(g), -1, 1)`` written back through the example's crop and flip.

    ``omega`` is read from the store (the value gathered at the start of the step). When an example
    appears more than once in the batch, its first occurrence wins and later ones change nothing.
    """
    size = (g.shape[-2], g.shape[-1])
    win = _window(store, index, crop, flip, size)
    omega = store[win]
    new = torch.clamp(omega + ratio * torch.sign(g).to(store.dtype), -1.0, 1.0).to(store.dtype)
    # Duplicates re-write their first occurrence's window with its value: every write to a
    # location then carries the same value, so the result does not depend on write order.
    src = first_position(index)
    win = _window(store, index[src], crop[src], flip[src], size)
    store[win] = new[src]


def pgd_step(x_adv: Tensor, x: Tensor, g: Tensor, step: float | Tensor, eps: float) -> Tensor:
    """One PGD step: sign ascent, projection onto the L-inf ball of radius ``eps`` around ``x``, clamp to [0,1]."""
    z = x_adv + step * torch.sign(g).to(x_adv.dtype)
    z = torch.minimum(torch.maximum(z, x - eps), x + eps)
    return torch.clamp(z, 0.0, 1.0)
