"""The reports of ``eval`` and ``demo``: one checkpoint's accuracies with their standard errors and the attacks'
settings, and the demo's one row per method with its cost against PGD-10."""

from __future__ import annotations

import json
from typing import Any

import torch

from apart_fast.report.text import markdown_table


def format_eval(res: dict[str, Any]) -> str:
    """The evaluation as a small table: one row per accuracy with its standard error, then the settings."""
    head = (f"{res['model']} ({res['checkpoint']}) on {res['dataset']}: {res['n']} test points ({res['test_points']}), "
            f"eps {res['eps'] * 255:.3g}/255 ({res['eps_source']}), device {res['device']}")
    rows = [("clean", res["clean_acc"], res["clean_se"])]
    names = {"pgd_ce": "PGD (CE)", "pgd_cw": "PGD (CW)", "autoattack": "AutoAttack"}
    rows += [(names[k], res[f"{k}_acc"], res[f"{k}_se"]) for k in names if f"{k}_acc" in res]
    lines = [head, "", *markdown_table(["attack", "accuracy", "std. error"], [[a, f"{v:.4f}", f"{se:.4f}"] for a, v, se in rows])]
    lines += ["", "settings:"] + [f"  {k}: {json.dumps(v)}" for k, v in res["settings"].items()]
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: method, clean acc, PGD-20 acc (and the weight average's), training seconds, cost relative to PGD-10
    (``demo``: CPU time on the CPU)."""
    ema = any(r.get("ema_robust_acc") is not None for r in rows)
    head = ["method", "clean acc", "PGD-20 acc", *(["EMA clean acc", "EMA PGD-20 acc"] if ema else []), "train s", "cost vs PGD-10"]
    lines = markdown_table(head, [
        [r["method"], f"{r['clean_acc']:.3f}", f"{r['robust_acc']:.3f}",
         *([f"{r['ema_clean_acc']:.3f}", f"{r['ema_robust_acc']:.3f}"] if ema else []), f"{r['seconds']:.1f}",
         f"{r['vs_pgd10']:.2f}x" if r.get("vs_pgd10") is not None else "n/a"] for r in rows])
    dev = rows[0]["device"] if rows else "?"
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "CPU"
    cost = "wall time" if dev.startswith("cuda") else "process CPU time, which other jobs on the machine do not add to"
    return "\n".join(lines) + (f"\n\nDevice: {name}; evaluation {rows[0]['eval'] if rows else ''} on the test split; "
                               f"train s: wall time; cost vs PGD-10: training's {cost}.")
