"""``reproduce``'s report: results.md (every method's accuracies with standard errors, which differences are noise,
how it was measured) and its figures (robust accuracy and perturbation strength per epoch, robustness curves,
APART's step sizes, the long runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apart_fast.report.figures import figure, footer, save
from apart_fast.report.text import indistinct, markdown_table, num, pm

LABELS = {"clean": "clean", "fgsm": "FGSM", "fgsm_rs": "FGSM-RS", "nfgsm": "N-FGSM", "gradalign": "GradAlign",
          "free": "Free", "pgd": "PGD-10", "apart": "APART",
          "long_fgsm": "long FGSM", "long_apart": "long APART"}


def within_noise(rows: list[dict[str, Any]], key: str = "pgd20_acc") -> list[str]:
    """Each pair of rows whose ``key`` accuracies differ by less than twice the standard error of the difference
    (sqrt(se_a^2 + se_b^2), test images treated as independent draws): differences the evaluation cannot resolve."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            va, vb = a.get(key), b.get(key)
            if va is not None and vb is not None and indistinct(va, vb, a["test_n"]):
                out.append(f"{LABELS.get(a['name'], a['name'])} vs {LABELS.get(b['name'], b['name'])} ({va:.3f} vs {vb:.3f})")
    return out


def format_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """results.md: the comparison table (± binomial standard error), the long runs if any, and how it was measured."""
    base = next((r["train_seconds"] for r in rows if r["name"] == "pgd"), None)
    ema = any(r.get("ema_pgd20_acc") is not None for r in rows)
    head = ["method", "clean", "PGD-20", "CW PGD-20", "AutoAttack ± s.e.", *(["EMA clean", "EMA PGD-20"] if ema else []),
            "held-out PGD-10 best (epoch)", "held-out PGD-10 last (epoch)", "best ckpt: clean / PGD-20", "train s", "vs PGD-10"]
    cells = []
    for r in rows:
        n = r["test_n"]
        cells.append([LABELS.get(r["name"], r["name"]), pm(r["clean_acc"], n), pm(r["pgd20_acc"], n), num(r["cw20_acc"]),
                      aa_cell(r), *([pm(r.get("ema_clean_acc"), n), pm(r.get("ema_pgd20_acc"), n)] if ema else []),
                      f"{num(r['best_holdout_robust'])} ({r['best_epoch']})", f"{num(r['last_holdout_robust'])} ({r['last_epoch']})",
                      f"{num(r['best_clean_acc'])} / {num(r['best_pgd20_acc'])}", f"{r['train_seconds']:.1f}",
                      f"{r['train_seconds'] / base:.2f}x" if base else "n/a"])
    lines = [f"# Reproduce: preset {info['preset']}", "", *markdown_table(head, cells)]
    s = info["settings"]
    same = within_noise(rows)
    lines += ["", "± is the binomial standard error sqrt(p(1-p)/n) over the n test images (one seed: seed-to-seed spread "
                  "is not in it). PGD-20 differences within 2 standard errors of the difference (noise): "
                  + ("; ".join(same) if same else "none") + "."]
    if ema:
        same = [f"{LABELS.get(r['name'], r['name'])} ({r['pgd20_acc']:.3f} vs {r['ema_pgd20_acc']:.3f})" for r in rows
                if r.get("ema_pgd20_acc") is not None and r.get("pgd20_acc") is not None
                and indistinct(r["ema_pgd20_acc"], r["pgd20_acc"], r["test_n"])]
        lines += [f"EMA (decay {s['ema']:g}, warm-up {s['ema_warmup']:g}) against the last model, PGD-20 within noise: "
                  + (", ".join(same) if same else "none") + "."]
    lines += [
        "",
        f"- Device: {info['device_name']} (`{info['device']}`), torch {info['torch']}.",
        f"- Data: {s['dataset']}, {s['n_train']} training images, test metrics on {s['n_test']} test images; "
        f"model {s['model']} width {s['width']}; {s['epochs']} epochs, batch {s['batch_size']}, cyclic lr to {s['lr']}, "
        f"eps {s['eps'] * 255:.3g}/255.",
        f"- PGD-20 and CW PGD-20: step 2/255, random start, eval mode, on the last epoch's model; held-out PGD-10 after "
        f"every epoch on up to {s['eval_n']} validation images (training split, not trained on); 'best ckpt' is "
        "model_best.pt (highest validation PGD-10), scored on the test images, which played no part in choosing it.",
        aa_note(rows),
        "- train s: training time only (no evaluation, no probe); Free runs ceil(epochs/m) passes of m replays.",
        f"- Wall time of the whole command: {info['wall_seconds'] / 60:.1f} min.",
        "",
        "Command:",
        "",
        f"    {info['command']}",
    ]
    return "\n".join(lines) + "\n"


def aa_cell(r: dict[str, Any]) -> str:
    """AutoAttack cell: accuracy ± standard error, or n/a (not run, or torchattacks missing)."""
    if r.get("aa_acc") is None:
        return "n/a"
    return f"{r['aa_acc']:.3f} ± {r['aa_se']:.3f}"


def aa_note(rows: list[dict[str, Any]]) -> str:
    """How AutoAttack was run: points, settings, or why it was not."""
    done = [r for r in rows if r.get("aa_settings")]
    if not done:
        why = next((r["aa_note"] for r in rows if r.get("aa_note")), "not run for these rows")
        return f"- AutoAttack: n/a ({why})."
    s = done[0]["aa_settings"]
    return (f"- AutoAttack ({s['library']}, {s['version']} L-inf: APGD-CE, APGD-T, FAB-T with {s['apgd_steps']} "
            f"iterations, Square {s['square_queries']} queries, seed {s['seed']}) on {done[0]['aa_n']} test points "
            f"(a seeded random subset unless that is all of them), eval mode; ± is the binomial standard error. "
            f"The curves (robustness_curves.png) use the same points.")


def series(row: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """(epoch, value) pairs of a history key; Free's epochs are scaled to data-pass equivalents."""
    k = row["data_passes_divisor"]
    pts = [(h["epoch"] * k, h[key]) for h in row["history"] if h.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_all(rows: list[dict[str, Any]], long_rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> list[str]:
    """Write the figures; return their file names."""
    names: list[str] = []
    if rows:
        fig, (ax,) = figure()
        for r in rows:
            ax.plot(*series(r, "holdout_robust_acc"), marker="o", ms=3, label=LABELS.get(r["name"], r["name"]))
        ax.set(xlabel="epoch", ylabel="held-out PGD-10 accuracy", title="Robust accuracy per epoch")
        ax.legend(fontsize=8)
        footer(fig, f"device: {info['device_name']}  |  {info['command']}")
        save(fig, out / "robust_acc.png")
        names.append("robust_acc.png")

        fig, (ax1, ax2) = figure(2)
        for r in rows:
            if r["method"] == "clean":
                continue
            label = LABELS.get(r["name"], r["name"])
            (line,) = ax1.plot(*series(r, "probe_strength_ratio"), marker="o", ms=3, label=label)
            ax2.plot(*series(r, "probe_cosine"), marker="o", ms=3, label=label, color=line.get_color())
        ax1.plot(*series(rows[0], "probe_noise_ratio"), ls=":", color="0.5", label="random sign noise")
        ax1.set(xlabel="epoch", ylabel="loss gain / PGD-10's loss gain", title="Perturbation strength ratio")
        ax2.set(xlabel="epoch", ylabel="cosine to PGD-10 perturbation", title="Perturbation direction")
        ax1.legend(fontsize=8)
        footer(fig, f"device: {info['device_name']}  |  {info['command']}")
        save(fig, out / "strength_ratio.png")
        names.append("strength_ratio.png")

    with_curves = {LABELS.get(r["name"], r["name"]): r["curve"] for r in rows if r.get("curve")}
    if with_curves:
        from apart_fast.attacks import plot_curves

        s = info["settings"]
        n = next(r["aa_n"] for r in rows if r.get("curve"))
        plot_curves(with_curves, out / "robustness_curves.png",
                    title=f"{s['model']} width {s['width']} on {s['dataset']}, {n} test points: one curve per method",
                    footer=f"device: {info['device_name']}  |  {info['command']}")
        names.append("robustness_curves.png")

    aparts = [r for r in rows + long_rows if r["method"] == "apart"]
    if aparts:
        r = aparts[-1] if long_rows else aparts[0]
        fig, (ax1, ax2) = figure(2)
        for key in ("a_init", "a_in"):
            ax1.plot(*series(r, key), marker="o", ms=3, label=key)
        ax1.axhline(info["settings"]["eps"], ls=":", color="0.5", label="eps")
        layers = sorted({k for h in r["history"] for k in h if k.startswith("a_layer")}, key=lambda k: int(k[7:]))
        for key in layers:
            ax2.plot(*series(r, key), label=key)
        ax1.set(xlabel="epoch", ylabel="step size (image units)", title=f"APART input step sizes ({LABELS[r['name']]})")
        ax2.set(xlabel="epoch", ylabel="step size", title="APART layer step sizes a_b")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=6, ncol=2)
        footer(fig, f"device: {info['device_name']}  |  {info['command']}")
        save(fig, out / "apart_step_sizes.png")
        names.append("apart_step_sizes.png")

    if long_rows:
        fig, (ax1, ax2) = figure(2)
        for r in long_rows:
            label = LABELS.get(r["name"], r["name"])
            (line,) = ax1.plot(*series(r, "holdout_robust_acc"), marker="o", ms=3, label=label)
            ax2.plot(*series(r, "probe_strength_ratio"), marker="o", ms=3, label=label, color=line.get_color())
            ax2.plot(*series(r, "probe_noise_ratio"), ls=":", color=line.get_color(), label=f"noise ({label} model)")
        ax1.set(xlabel="epoch", ylabel="held-out PGD-10 accuracy", title="Long runs: robust accuracy")
        ax2.set(xlabel="epoch", ylabel="loss gain / PGD-10's", title="Long runs: perturbation strength ratio")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=7)
        footer(fig, f"device: {info['device_name']}  |  {info['command']}")
        save(fig, out / "long_fgsm.png")
        names.append("long_fgsm.png")
    return names
