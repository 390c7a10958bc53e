"""The pieces every report's figures share: matplotlib without a display, a row of panels, a footer naming the device
and the command, a PNG written and closed."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only; imported on first use, so reports load without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(ncols: int = 1) -> tuple[Any, Any]:
    """A figure of ``ncols`` panels side by side, room left below for the footer; returns (figure, panels)."""
    fig, axes = pyplot().subplots(1, ncols, figsize=(5.2 * ncols, 4.0), squeeze=False)
    fig.subplots_adjust(bottom=0.2, wspace=0.3)
    return fig, axes[0]


def footer(fig: Any, text: str) -> None:
    """Small grey text at the figure's foot (the device and the command that made it), wrapped at 150 characters."""
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(text, 150)), fontsize=6, va="bottom", ha="left", color="0.3")


def save(fig: Any, path: Path, dpi: int = 90) -> None:
    """Write ``fig`` to ``path`` and free it."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
