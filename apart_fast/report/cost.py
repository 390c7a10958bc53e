"""``bench cost``'s report: cost.md (the command, device, versions and caveats, then one row per method: step time with
its spread, per update and per epoch, against PGD-k and clean, peak memory, launches; the trained accuracies; the
stated ratios) and cost.png (time per epoch against PGD-k, accuracies beside it when trained)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from apart_fast.report.figures import pyplot, save
from apart_fast.report.text import acc, markdown_table, mib, ms, ratio

LABELS = {"clean": "clean", "fgsm": "FGSM", "fgsm_rs": "FGSM-RS", "nfgsm": "N-FGSM", "gradalign": "GradAlign", "free": "Free",
          "pgd": "PGD", "apart": "APART"}
# (method, reference) step-time ratios the project states: APART's cost claims, and N-FGSM costing what FGSM-RS costs
CLAIMS = (("apart", "pgd"), ("apart", "clean"), ("nfgsm", "fgsm_rs"), ("gradalign", "fgsm_rs"))


def markdown(result: dict[str, Any]) -> str:
    """The table users paste, with the command, device, versions and caveats above it."""
    env, o, rows = result["env"], result["options"], result["rows"]
    d = result["data"]
    lines = [
        f"# bench cost: {o['model']} width {o['width']}, batch {o['batch_size']}, {o['dtype']}, {env['device_name']}",
        "",
        f"- command: `{env['command']}`",
        f"- device: {env['device']} ({env['device_name']}); CPU {env['cpu_model']}, {env['cpu_count']} cores, "
        f"torch threads {env['torch_threads']}, load average (1/5/15 min) {env['load_avg_1_5_15']} at start, "
        f"{env.get('load_avg_after_timing')} after timing",
        f"- torch {env['torch']}, triton {env['triton']}, commit {env['apart_fast_commit']}, "
        f"op backend {rows[0]['backend'] if rows else '-'}",
        f"- data: {d['name']} {d['channels']}x{d['image_size'][0]}x{d['image_size'][1]}, {d['n_train']} training examples; "
        f"epoch = {d['epoch_size']} examples",
        f"- timing: {result['timing']}; {o['warmup']} warm-up + {o['steps']} timed steps x {o['rounds']} round(s) per method",
        f"- memory: {result['memory']}",
        f"- launches: per step, {rows[0].get('launch_kind', 'not counted yet') if rows else '-'} of one more step, "
        "under torch.profiler",
        "",
        f"- CUDA graphs: {', '.join(r['label'] for r in rows if r.get('cuda_graphs')) or 'none'}; "
        f"torch.compile: {o.get('compile_backend', 'inductor') if o.get('compile') else 'off'}; weight averaging: "
        + (f"EMA {o['ema']:g} updated after every step" if o.get("ema") is not None else "off"),
        "",
    ]
    head = ["method", "passes/step", "ms/step (median)", "IQR ms", "min-max ms", "ms/update", "images/s", "s/epoch",
            "x PGD (step)", "x PGD (epoch)", "x clean (step)", "peak MiB", "launches"]
    lines += markdown_table(head, [
        [r["label"], str(r["passes_per_step"]), ms(r["step_s"]["median"]), ms(r["step_s"]["iqr"]),
         f"{ms(r['step_s']['min'])}-{ms(r['step_s']['max'])}", ms(r["s_per_update"]), f"{r['images_per_s']:.0f}",
         f"{r['s_per_epoch']:.2f}", ratio(r["step_vs_pgd"]), ratio(r["epoch_vs_pgd"]), ratio(r["step_vs_clean"]),
         mib(r["peak_mem_bytes"]), str(r.get("launches_per_step", "-"))] for r in rows], align="l" + "r" * 12)
    if any(r["method"] == "free" for r in rows):
        m = next(r for r in rows if r["method"] == "free")["epoch_divisor"]
        lines += ["", f"Free: one step replays its batch m={m} times (m forward/backward passes, m updates); ms/update is "
                      f"per replay. Its E-epoch run makes E/m passes over the data, so s/epoch = step x steps/pass / m."]
    if any("train" in r for r in rows):
        trained = [(r["label"], r["train"]) for r in rows if r.get("train")]
        lines += ["", *markdown_table(
            ["method", "passes over data", "train s", "train s/epoch", "clean acc", "robust acc", "eval"],
            [[label, str(t["epochs"]), f"{t['train_seconds']:.1f}", f"{t['train_s_per_epoch']:.1f}", f"{t['test_clean_acc']:.4f}",
              acc(t["test_robust_acc"]), f"{t['eval']} on {t['test_n']}"] for label, t in trained], align="lrrrrrl")]
    c = result.get("claims", {})
    stated = [(m, ref) for m, ref in CLAIMS if c.get(f"{m}_step_vs_{ref}") is not None]
    if stated:
        lines.append("")
    for m, ref in stated:
        k = f"{m}_step_vs_{ref}"
        label = f"PGD-{o['pgd_steps']}" if ref == "pgd" else LABELS[ref]
        lines.append(f"- {LABELS[m]} step / {label} step: {ratio(c[k])} (medians), "
                     f"{ratio(c[k + '_paired'])} (median over {o['rounds']} rounds of the per-round ratio), "
                     f"{ratio(c[k + '_min'])} (fastest steps)")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of time per epoch relative to PGD-k; clean and robust accuracy beside it when trained."""
    rows = result["rows"]
    trained = [r for r in rows if r.get("train") and r["train"].get("test_robust_acc") is not None]
    fig, axes = pyplot().subplots(1, 2 if trained else 1, figsize=(11 if trained else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    labels = [r["label"] for r in rows]
    ref = "pgd" if any(r["method"] == "pgd" for r in rows) else "clean" if any(r["method"] == "clean" for r in rows) else None
    if ref:
        vals = [r[f"epoch_vs_{ref}"] for r in rows]
        ax.set_ylabel(f"time per epoch / {'PGD' if ref == 'pgd' else 'clean'}'s")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    else:
        vals = [r["s_per_epoch"] for r in rows]
        ax.set_ylabel("seconds per epoch")
    bars = ax.bar(labels, vals, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_title("training cost")
    if trained:
        ax2 = axes[0][1]
        x = range(len(trained))
        ax2.bar([i - 0.2 for i in x], [r["train"]["test_clean_acc"] for r in trained], 0.4, label="clean")
        ax2.bar([i + 0.2 for i in x], [r["train"]["test_robust_acc"] for r in trained], 0.4, label="PGD-20")
        ax2.set_xticks(list(x), [r["label"] for r in trained])
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("test accuracy")
        ax2.set_title(f"after {result['options']['train_epochs']} epoch(s)")
        ax2.legend(fontsize=8)
    env = result["env"]
    cmd = textwrap.fill(env["command"], 130 if trained else 100, break_on_hyphens=False)
    fig.suptitle(f"{env['device_name']} ({env['torch_threads']} torch threads; ratio per epoch of training budget)\n{cmd}",
                 fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=110)
