"""Robustness curves: PGD accuracy against the budget eps and against the number of PGD steps.

A curve says more than one number: accuracy should fall smoothly to zero as eps grows and flatten
(never rise) as steps grow; a curve that stalls above zero or rises with steps is the classic
picture of masked gradients. ``plot_curves`` draws one or several models' curves on one figure.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from apart_fast.attacks.pgd import evaluate

STEPS_GRID = (1, 2, 5, 10, 20, 50, 100)


def eps_grid(eps: float, largest: float = 0.5) -> list[float]:
    """Budgets eps/4, eps/2, eps, 2 eps, 4 eps, ... (doubling) below ``largest``, then ``largest`` itself."""
    if not 0.0 < eps < largest <= 1.0:
        raise ValueError(f"need 0 < eps < largest <= 1, got eps {eps} and largest {largest}")
    grid, e = [eps / 4, eps / 2], eps
    while e < largest * 0.99:
        grid.append(e)
        e *= 2
    return grid + [largest]


def robustness_curve(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, eps_values: list[float] | None = None,
                     steps_values: tuple[int, ...] = STEPS_GRID, steps: int = 20, step: float | None = None,
                     largest: float = 0.5, batch_size: int = 256, seed: int = 0, backend: str = "auto",
                     progress: bool = False) -> dict[str, Any]:
    """PGD-``steps`` accuracy at each budget (step e/4) and PGD-k accuracy at ``eps`` for each k (step eps/4).

    Returns ``{"clean_acc", "n", "eps", "eps_values", "eps_acc", "steps", "steps_values", "steps_acc"}``.
    """
    eps_values = eps_grid(eps, largest) if eps_values is None else list(eps_values)
    step = eps / 4 if step is None else step
    kw: dict[str, Any] = dict(batch_size=batch_size, seed=seed, backend=backend, progress=progress)
    clean = evaluate(model, x, y, steps=0, **kw)["clean_acc"]
    eps_acc = [evaluate(model, x, y, eps=e, step=e / 4, steps=steps, **kw)["robust_acc"] for e in eps_values]
    steps_acc = [evaluate(model, x, y, eps=eps, step=step, steps=k, **kw)["robust_acc"] for k in steps_values]
    return {"clean_acc": clean, "n": int(x.shape[0]), "eps": eps, "step": step, "steps": steps,
            "eps_values": eps_values, "eps_acc": eps_acc, "steps_values": list(steps_values), "steps_acc": steps_acc}


def plot_curves(curves: dict[str, dict[str, Any]], path: str | Path, *, title: str, footer: str) -> None:
    """One PNG: accuracy against eps (left) and against PGD steps (right), one line per named curve.

    ``title`` names the model(s) and data, ``footer`` the device and the command that made the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.4, 4.2))
    fig.subplots_adjust(bottom=0.24, wspace=0.3, top=0.86)
    for label, c in curves.items():
        (line,) = ax1.plot([e * 255 for e in c["eps_values"]], c["eps_acc"], marker="o", ms=3, label=label)
        ax1.axvline(c["eps"] * 255, ls=":", color=line.get_color(), lw=0.8)
        ax2.plot(c["steps_values"], c["steps_acc"], marker="o", ms=3, label=label, color=line.get_color())
    first = next(iter(curves.values()))
    ax1.set(xlabel="eps (x/255)", ylabel=f"PGD-{first['steps']} accuracy", xscale="log", ylim=(-0.02, 1.02),
            title="Accuracy against the budget")
    ax2.set(xlabel="PGD steps", ylabel="accuracy", xscale="log", ylim=(-0.02, 1.02),
            title=f"Accuracy against steps (eps {first['eps'] * 255:.3g}/255)")
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(footer, 160)), fontsize=6, va="bottom", ha="left", color="0.3")
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["STEPS_GRID", "eps_grid", "plot_curves", "robustness_curve"]
