"""Per-epoch diagnostics of a run's training perturbation (placeholder until the study issue lands)."""

from __future__ import annotations

from typing import Any


def epoch_probe(run: Any) -> dict[str, float]:
    """Values logged after each epoch; none yet."""
    return {}
