"""The pieces every markdown report shares: number cells, binomial standard errors, a markdown table, the device."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Sequence

import torch


def num(v: float | None, fmt: str = ".3f") -> str:
    """``v`` in ``fmt``, or n/a for a number that was not measured."""
    return "n/a" if v is None else format(v, fmt)


def standard_error(acc: float | None, n: int) -> float | None:
    """Binomial standard error of an accuracy measured on ``n`` test images (the evaluation's noise, not the seed's)."""
    if acc is None or n < 1:
        return None
    return (acc * (1 - acc) / n) ** 0.5


def pm(acc: float | None, n: int) -> str:
    """An accuracy on ``n`` test images with its standard error: ``0.512 ± 0.022`` (n/a when there is none)."""
    se = standard_error(acc, n)
    return "n/a" if se is None else f"{acc:.3f} ± {se:.3f}"


def indistinct(a: float, b: float, n: int) -> bool:
    """Whether accuracies ``a`` and ``b`` on ``n`` test images each differ by less than 2 standard errors of the difference."""
    return abs(a - b) < 2 * (standard_error(a, n) ** 2 + standard_error(b, n) ** 2) ** 0.5


def ms(s: float) -> str:
    """Seconds as milliseconds, one decimal below 10 s."""
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def ratio(v: float | None) -> str:
    """A ratio to three decimals, - where there is none."""
    return "-" if v is None else f"{v:.3f}"


def mib(b: int | None) -> str:
    """Bytes in MiB, - where not measured."""
    return "-" if b is None else f"{b / 2**20:.0f}"


def acc(v: float | None) -> str:
    """An accuracy to four decimals, - where not measured."""
    return "-" if v is None else f"{v:.4f}"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """A markdown table's lines: the header, its rule (``align``: l or r per column, left where not given), the rows."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align.ljust(len(head), "l")) + "|"
    return [_line(head), rule, *(_line(r) for r in rows)]


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def device_label(device: str) -> str:
    """The device in words for a report's table and figures: the GPU's name, or the CPU, its cores and torch threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
