"""The ablation's table, target checks and figures, from the finished units of ``apart-fast ablation``.

Every accuracy is a mean over the row's seeds with a standard error that combines the seed spread
(sample standard deviation / sqrt(seeds), none with one seed) and the test-set binomial error
sqrt(p(1-p)/n) (the same test points for every unit, so it does not shrink with more seeds).
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

from apart_fast.ablation import MAIN_ROWS, ROWS, load_units

ROW_ORDER = tuple(ROWS)


def mean_se(values: list[float], n_test: int) -> tuple[float, float, float | None]:
    """(mean, combined standard error, seed standard error or None with one seed) of per-seed accuracies."""
    m = statistics.fmean(values)
    seed_se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    test_se = math.sqrt(max(m * (1 - m), 0.0) / n_test)
    return m, math.sqrt((seed_se or 0.0) ** 2 + test_se**2), seed_se


def summarize(units: list[dict[str, Any]]) -> dict[float, dict[str, dict[str, Any]]]:
    """eps -> row -> the row's seeds, accuracy means with standard errors and end step sizes (in units of eps)."""
    out: dict[float, dict[str, dict[str, Any]]] = {}
    for u in units:
        out.setdefault(u["eps"], {}).setdefault(u["row"], {"units": []})["units"].append(u)
    for eps, rows in out.items():
        for s in rows.values():
            us = sorted(s["units"], key=lambda u: u["seed"])
            n = us[0]["n"]
            s["seeds"] = [u["seed"] for u in us]
            for key in ("clean", "pgd_ce", "pgd_cw"):
                s[key] = mean_se([u[key] for u in us], n)
            s["worst"] = mean_se([min(u["pgd_ce"], u["pgd_cw"]) for u in us], n)
            aa = [u for u in us if u.get("aa") is not None]
            s["aa"] = (aa[0]["aa"], math.sqrt(aa[0]["aa"] * (1 - aa[0]["aa"]) / aa[0]["aa_n"]), aa[0]["aa_n"]) if aa else None
            s["pgd_on_aa"] = aa[0].get("pgd_on_aa") if aa else None  # PGD-20's worst of CE, CW on AutoAttack's points
            s["train_seconds"] = statistics.fmean(u["train_seconds"] for u in us)
            last = [u["history"][-1] for u in us if u["history"] and "a_in" in u["history"][-1]]
            if last:
                first = us[0]["generator"] or {}
                blocks = [[h[k] / eps for k in h if k.startswith("a_layer")] for h in last]
                s["steps"] = {"a_in_start": (first.get("a_in") or 0.0) / eps, "a_init_start": (first.get("a_init") or 0.0) / eps,
                              "a_in": statistics.fmean(h["a_in"] for h in last) / eps,
                              "a_init": statistics.fmean(h["a_init"] for h in last) / eps,
                              "blocks": statistics.fmean(statistics.fmean(b) for b in blocks) if blocks and blocks[0] else None,
                              "blocks_min": min(min(b) for b in blocks) if blocks and blocks[0] else None}
    return out


def _pm(v: tuple[float, float, float | None] | None) -> str:
    return "—" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def _diff(a: tuple[float, float, Any], b: tuple[float, float, Any]) -> tuple[float, float]:
    """Difference of two row means and its standard error (the rows' errors treated as independent)."""
    return a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)


def targets(summary: dict[float, dict[str, dict[str, Any]]]) -> list[str]:
    """Issue 19's targets, each checked on the numbers: 'MET' / 'NOT MET' with the figures behind it."""
    lines = []
    for eps, rows in sorted(summary.items()):
        k = f"{eps * 255:.3g}/255"
        d = rows.get("default")
        if d is None:
            continue
        for ref in ("frozen_start", "frozen_end"):
            if ref in rows:
                diff, se = _diff(d["worst"], rows[ref]["worst"])
                ok = diff >= 2 * se
                lines.append(f"- {k}: learned vs {ROWS[ref][1]}: {diff:+.3f} ± {se:.3f} "
                             f"({diff / se:+.1f} s.e.; 2 s.e. needed) — {'MET' if ok else 'NOT MET'}")
        st = d.get("steps")
        if st:
            grow = st["a_in"] / st["a_in_start"] if st["a_in_start"] else math.inf
            ok = grow >= 2 and 0.25 <= st["a_in"] <= 2
            blocks = st["blocks"]
            lines.append(f"- {k}: progressive: a_in {st['a_in_start']:.3g} -> {st['a_in']:.3f} eps ({grow:.3g}x; needs >= 2x and "
                         f"within [0.25, 2] eps) — {'MET' if ok else 'NOT MET'}; block steps end at {blocks:.3f} eps on average "
                         f"(smallest {st['blocks_min']:.3f}) — {'MET' if blocks and st['blocks_min'] > 0.01 else 'NOT MET'}")
        checks = [("nfgsm", 0.0)] + ([("fgsm_rs", 0.05)] if abs(eps - 8 / 255) < 1e-6 else [("fgsm_rs", 0.10)])
        for ref, margin in checks:
            if ref in rows:
                diff, se = _diff(d["worst"], rows[ref]["worst"])
                lines.append(f"- {k}: no regression: default - {ROWS[ref][1]} = {diff:+.3f} ± {se:.3f} (needs >= {margin:+.2f}) — "
                             f"{'MET' if diff >= margin else 'NOT MET'}")
    return lines


def _cost(cost: dict[str, Any] | None, row: str) -> str:
    """A row's step time relative to PGD-10's from cost.json (the default's operations for frozen, script and full)."""
    if not cost:
        return "—"
    key = row if row in cost["rows"] else ROWS[row][0]
    v = cost["rows"].get(key, {}).get("vs_pgd10")
    return "—" if v is None else f"{v:.2f}x"


def markdown(summary: dict[float, dict[str, dict[str, Any]]], study: dict[str, Any], command: str | None,
             cost: dict[str, Any] | None = None) -> str:
    """ablation.md: one table per eps, the target checks and how it was measured."""
    lines = ["# APART ablation", ""]
    for eps, rows in sorted(summary.items()):
        lines += [f"## eps {eps * 255:.3g}/255", "",
                  "| row | seeds | clean | PGD-20 CE | PGD-20 CW | worst of CE, CW | AutoAttack (seed 0) | a_in / eps (start -> end) "
                  "| a_init / eps (end) | mean a_b / eps (end) | step cost vs PGD-10 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in ROW_ORDER:
            s = rows.get(row)
            if s is None:
                continue
            st = s.get("steps")
            aa = f"{s['aa'][0]:.3f} ± {s['aa'][1]:.3f} (n={s['aa'][2]})" if s["aa"] else "—"
            if s["aa"] and s["pgd_on_aa"] is not None:
                aa += f"; PGD-20 {s['pgd_on_aa']:.3f}"
            a_in = f"{st['a_in_start']:.3g} -> {st['a_in']:.3f}" if st else "—"
            a_init = f"{st['a_init']:.3f}" if st else "—"
            blocks = f"{st['blocks']:.3f}" if st and st["blocks"] is not None else "—"
            lines.append(f"| {ROWS[row][1]} | {len(s['seeds'])} | {_pm(s['clean'])} | {_pm(s['pgd_ce'])} | {_pm(s['pgd_cw'])} "
                         f"| **{_pm(s['worst'])}** | {aa} | {a_in} | {a_init} | {blocks} | {_cost(cost, row)} |")
        lines.append("")
    lines += ["## Targets (issue 19)", "", *targets(summary), "",
              "± combines the seed spread (standard deviation / sqrt(seeds); none with one seed) and the test-set binomial "
              "error sqrt(p(1-p)/n) over the same test points for every row. Differences are checked against "
              "sqrt(se_a^2 + se_b^2).", "",
              f"- Setting: CIFAR-10 (JPEG) `{study['data_dir']}`, a seeded {study['train_subset']}-image training subset (the "
              f"seed draws it), {study['model']} width {study['width']}, {study['epochs']} epochs of batch {study['batch_size']}, "
              f"cyclic lr to {study['lr']}, no validation slice, the last model scored.",
              f"- Evaluation: eval mode, PGD-20 (step eps/4, one random start) with the CE and the CW loss on a seeded "
              f"{study['test_n']}-point test subset (the same points for every unit); AutoAttack (torchattacks, standard "
              f"version) on the first {study['aa_n']} of them for seeds below {study['aa_seeds']}, beside PGD-20's worst of "
              f"CE and CW on the same points.",
              f"- Step cost: seconds per training step relative to PGD-10's, medians of every method timed round-robin in one "
              f"process ({cost['rounds'] if cost else 0} rounds; `bench.cost.measure`); frozen, script and full compute what "
              "the default computes.",
              f"- Device: {study.get('device_name', study['device'])}."]
    if command:
        lines += ["", "Command:", "", f"    {command}"]
    return "\n".join(lines) + "\n"


def _series(u: dict[str, Any], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    pts = [(h["epoch"], h[key] / scale) for h in u["history"] if h.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def figures(summary: dict[float, dict[str, dict[str, Any]]], out: Path, footer: str) -> list[str]:
    """ablation_steps.png (step-size trajectories beside the strength probe) and ablation_bars.png; their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    eps_list = sorted(summary)
    fig, axes = plt.subplots(len(eps_list), 3, figsize=(15, 3.8 * len(eps_list)), squeeze=False)
    for (ax1, ax2, ax3), eps in zip(axes, eps_list):
        rows, k = summary[eps], f"{eps * 255:.3g}/255"
        for row, style in (("default", "-"), ("script", "--")):
            if row not in rows:
                continue
            u = rows[row]["units"][0]
            for key, color in (("a_in", "C0"), ("a_init", "C1")):
                ax1.plot(*_series(u, key, eps), style, color=color, marker="o", ms=3, label=f"{key} ({row})")
            layers = sorted((key for key in u["history"][-1] if key.startswith("a_layer")), key=lambda s: int(s[7:]))
            for i, key in enumerate(layers):
                ax2.plot(*_series(u, key, eps), style, color=plt.cm.viridis(i / max(len(layers) - 1, 1)),
                         label=f"block {i}" if row == "default" else None)
        ax1.set(xlabel="epoch", ylabel="step size / eps", title=f"input step sizes, eps {k} (— default, -- script)")
        ax2.set(xlabel="epoch", ylabel="step size / eps", title=f"block step sizes a_b, eps {k}")
        for ax, kw in ((ax1, dict(fontsize=7)), (ax2, dict(fontsize=6, ncol=2))):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(**kw)
            else:  # neither the default's nor the script's unit has finished at this eps
                ax.text(0.5, 0.5, "no default or script unit yet", ha="center", va="center", transform=ax.transAxes)
        for row, color in (("default", "C0"), ("frozen_end", "C4"), ("fgsm_rs", "C3"), ("nfgsm", "C2")):
            if row in rows:
                u = rows[row]["units"][0]
                ax3.plot(*_series(u, "probe_strength_ratio"), color=color, marker="o", ms=3, label=ROWS[row][1])
        some = next(iter(rows.values()))["units"][0]
        ax3.plot(*_series(some, "probe_noise_ratio"), ":", color="0.5", label="random sign noise")
        ax3.set(xlabel="epoch", ylabel="loss gain / PGD-10's loss gain", title=f"perturbation strength (seed 0), eps {k}")
        ax3.legend(fontsize=7)
    fig.text(0.01, 0.003, "\n".join(textwrap.wrap(footer, 180)), fontsize=6, va="bottom", color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "ablation_steps.png", dpi=80)
    plt.close(fig)
    names.append("ablation_steps.png")

    fig, axes = plt.subplots(1, len(eps_list), figsize=(6.5 * len(eps_list), 4.2), squeeze=False)
    for ax, eps in zip(axes[0], eps_list):
        rows = [r for r in ROW_ORDER if r in summary[eps]]
        vals = [summary[eps][r]["worst"] for r in rows]
        ax.barh(range(len(rows)), [v[0] for v in vals], xerr=[v[1] for v in vals], capsize=3,
                color=["C0" if ROWS[r][0] == "apart" else "C3" for r in rows])
        ax.set_yticks(range(len(rows)), [f"{ROWS[r][1]} ({len(summary[eps][r]['seeds'])})" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="worst of PGD-20 CE, CW (mean ± s.e.)", title=f"eps {eps * 255:.3g}/255")
    fig.text(0.01, 0.003, "\n".join(textwrap.wrap(footer, 180)), fontsize=6, va="bottom", color="0.3")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "ablation_bars.png", dpi=80)
    plt.close(fig)
    names.append("ablation_bars.png")
    return names


def write(out: Path, command: str | None = None) -> list[str]:
    """ablation.md, ablation.json and the figures of every finished unit in ``out``; the files' names."""
    units = load_units(out)
    study = json.loads((out / "study.json").read_text())
    if not units:
        (out / "ablation.md").write_text("# APART ablation\n\nNo unit has finished yet.\n")
        return ["ablation.md (no unit has finished yet)"]
    summary = summarize(units)
    footer = f"device: {study.get('device_name', study['device'])}" + (f"  |  {command}" if command else "")
    cost = json.loads((out / "cost.json").read_text()) if (out / "cost.json").exists() else None
    (out / "ablation.md").write_text(markdown(summary, study, command, cost))
    slim = {str(e): {r: {k: v for k, v in s.items() if k != "units"} for r, s in rows.items()} for e, rows in summary.items()}
    (out / "ablation.json").write_text(json.dumps({"study": study, "command": command, "summary": slim,
                                                   "main_rows": MAIN_ROWS}, indent=1))
    return ["ablation.md", "ablation.json", *figures(summary, out, footer)]
