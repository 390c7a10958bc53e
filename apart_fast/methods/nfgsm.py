"""N-FGSM (de Jorge et al. 2022, "Make Some Noise"): one FGSM step from a large random start, not projected.

The noise is U(-k*eps, k*eps) (k = 2 in the paper) and the sign step has size eps; the result is clipped
to the image range [0,1] only, so its distance from x reaches (k+1)*eps. The paper shows that the strong
noise alone, without clipping to the eps-ball, avoids catastrophic overfitting at FGSM's cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from apart_fast.methods.base import Method

if TYPE_CHECKING:
    from apart_fast.data import Batch


class NFGSM(Method):
    """x + U(-k*eps, k*eps), one sign step of ``nfgsm_step`` (default eps), clipped to [0,1] only."""

    name = "nfgsm"
    passes = 2

    def step_size(self) -> float:
        """Size of the sign step (image units)."""
        return self.cfg.nfgsm_step if self.cfg.nfgsm_step is not None else self.cfg.eps

    @property
    def linf_bound(self) -> float:
        return self.cfg.nfgsm_k * self.cfg.eps + self.step_size()

    def perturb(self, batch: Batch) -> Tensor:
        x0 = self.uniform_start(batch.x, self.cfg.nfgsm_k * self.cfg.eps)
        g = self.input_grad(x0, batch.y)
        return torch.clamp(x0 + self.step_size() * torch.sign(g), 0.0, 1.0)
