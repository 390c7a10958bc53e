"""Standard (non-adversarial) training: the cost floor every method is compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from apart_fast.methods.base import Method

if TYPE_CHECKING:
    from apart_fast.data import Batch


class Clean(Method):
    """Trains on the unperturbed batch."""

    name = "clean"
    passes = 1

    def perturb(self, batch: Batch) -> Tensor:
        return batch.x
