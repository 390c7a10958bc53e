"""GradAlign (Andriushchenko and Flammarion 2020, "Understanding and Improving Fast Adversarial Training").

FGSM-RS training plus a regulariser that keeps the loss locally linear in the input, the property whose
loss they identify as the cause of catastrophic overfitting:

    loss = CE(f(x_fgsm_rs), y) + lambda * (1 - mean_i cos(grad_x CE(x_i), grad_x CE(x_i + eta_i))),
    eta ~ U(-eps, eps)

with lambda = 0.2 for eps 8/255 (the paper's CIFAR-10 value). As in the paper, the gradient at the clean
input is a constant and only the one at the noisy input is differentiated (double backpropagation);
examples whose gradient is exactly zero at either point are left out of the mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from apart_fast.methods.fgsm import FGSMRS
from apart_fast.step.guard import grads_of

if TYPE_CHECKING:
    from apart_fast.data import Batch


def alignment(g_clean: Tensor, g_noisy: Tensor) -> Tensor:
    """Mean per-example cosine between two input gradients over the examples where both are non-zero
    (0 when there are none); a boolean mask and a clamped count instead of indexing: no host sync."""
    dtype = torch.promote_types(g_noisy.dtype, torch.float32)  # fp16/bf16 gradients: cosine in float32
    a, b = g_clean.flatten(1).to(dtype), g_noisy.flatten(1).to(dtype)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    tiny = torch.finfo(dtype).tiny
    cos = ((a / na.clamp_min(tiny)[:, None]) * (b / nb.clamp_min(tiny)[:, None])).sum(1)
    keep = (na > 0) & (nb > 0)
    return torch.where(keep, cos, torch.zeros_like(cos)).sum() / keep.sum().clamp_min(1)


class GradAlign(FGSMRS):
    """FGSM-RS's perturbation; the update adds ``gradalign_lambda`` * (1 - gradient alignment)."""

    name = "gradalign"
    # attack, gradient at x, gradient at x + eta (kept for double backprop), the update, and the
    # double backward through the noisy gradient's graph counted as one more
    passes = 5
    capturable = False  # double backward under CUDA-graph capture is not yet checked on a GPU

    def regularizer(self, x: Tensor, y: Tensor) -> Tensor:
        """lambda * (1 - alignment), differentiable in the parameters through the noisy-input gradient."""
        g_clean = self.input_grad(x, y).detach()
        x_noisy = self.uniform_start(x, self.cfg.eps).requires_grad_(True)
        with self.precision.autocast():
            loss = F.cross_entropy(self.model(x_noisy), y)
        # fp16: the scaled loss keeps the gradient from underflowing; the cosine ignores the scale.
        (g_noisy,) = torch.autograd.grad(self.precision.scaled(loss), x_noisy, create_graph=True)
        return self.cfg.gradalign_lambda * (1.0 - alignment(g_clean, g_noisy))

    def step(self, batch: Batch) -> dict[str, Tensor]:
        x_adv = self.perturb(batch).detach()
        self.optimizer.zero_grad(set_to_none=True)
        reg = self.regularizer(batch.x, batch.y)
        with self.precision.autocast():
            logits = self.model(x_adv)
            loss = F.cross_entropy(logits, batch.y)
        total = loss + reg
        self.precision.scaled(total).backward()
        self.step_ok = self.finish_backward(total, grads_of(self.optimizer))
        self.update_model(self.step_ok)
        return self.metrics(loss, logits, batch.y)
