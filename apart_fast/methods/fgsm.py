"""Single-step methods: FGSM from zero and FGSM with a uniform random start (Wong et al. 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from apart_fast import ops
from apart_fast.methods.base import Method

if TYPE_CHECKING:
    from apart_fast.data import Batch


class FGSM(Method):
    """One sign step of size ``fgsm_step`` (default eps) from the clean input."""

    name = "fgsm"
    passes = 2

    def start(self, x: Tensor) -> Tensor:
        """The point the sign step starts from."""
        return x

    def step_size(self) -> float:
        """Size of the sign step (image units)."""
        return self.cfg.fgsm_step if self.cfg.fgsm_step is not None else self.cfg.eps

    def perturb(self, batch: Batch) -> Tensor:
        x0 = self.start(batch.x)
        g = self.input_grad(x0, batch.y)
        return ops.pgd_step(x0, batch.x, g, self.step_size(), self.cfg.eps, backend=self.cfg.backend)


class FGSMRS(FGSM):
    """FGSM from U(-eps, eps) noise with step 1.25*eps, projected back onto the eps-ball."""

    name = "fgsm_rs"

    def start(self, x: Tensor) -> Tensor:
        return self.uniform_start(x, self.cfg.eps)

    def step_size(self) -> float:
        return self.cfg.fgsm_step if self.cfg.fgsm_step is not None else 1.25 * self.cfg.eps
