"""PGD-k adversarial training (Madry et al. 2018): k sign steps from a random start, then the update."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from apart_fast import ops
from apart_fast.methods.base import Method

if TYPE_CHECKING:
    from apart_fast.data import Batch


class PGD(Method):
    """k attack steps of ``pgd_step`` inside the eps-ball (random start), in training mode."""

    name = "pgd"
    passes = 11  # for k = 10; see passes_per_step

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes = self.cfg.pgd_steps + 1

    def perturb(self, batch: Batch) -> Tensor:
        x, y, eps = batch.x, batch.y, self.cfg.eps
        x_adv = self.uniform_start(x, eps)
        for _ in range(self.cfg.pgd_steps):
            g = self.input_grad(x_adv, y)
            x_adv = ops.pgd_step(x_adv, x, g, self.cfg.pgd_step, eps, backend=self.cfg.backend)
        return x_adv
