"""One summary of a ``gpu_suite.sh`` output folder: ``summary.md`` (tables to paste into the README as they
are) and ``summary.json`` (the same figures), from the suite's steps.tsv, logs and the bench commands' JSON.

Standard library only and lenient: a step that failed or never ran leaves its section saying so, and the
summary can be rebuilt after every step (the suite does), so a lease cut short still returns one.
Usage: ``python benchmarks/gpu_summary.py OUTDIR``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

# (folder under OUTDIR, what it measures) of the per-step cost comparison, in the order of the columns
COST_RUNS = (("cost-b128", "graphs"), ("cost-b512", "graphs"), ("cost-b128-eager", "eager"),
             ("cost-b128-compile", "graphs+compile"))
# providers of the kernel table, in column order (extra_info "backend" of benchmarks/test_ops_bench.py)
PROVIDERS = ("cuda", "triton", "cpp", "eager", "compile")
OUTCOMES = "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS"
# ``pytest -v``: "tests/x.py::test_y PASSED [ 5%]"; with xdist: "[gw0] [ 5%] PASSED tests/x.py::test_y"
TEST_LINE = re.compile(rf"^(?P<id>\S+::\S+)\s+(?P<o>{OUTCOMES})\b|^\[gw\d+\].*?\b(?P<o2>{OUTCOMES})\s+(?P<id2>\S+::\S+)")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _us(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def steps(out: Path) -> list[dict[str, str]]:
    """The rows of steps.tsv: step, status, rc, seconds, log."""
    try:
        lines = (out / "steps.tsv").read_text().splitlines()
    except OSError:
        return []
    head = lines[0].split("\t") if lines else []
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line.strip()]


def gpu_tests(out: Path) -> dict[str, Any] | None:
    """Outcome counts and the failing tests, from the ``pytest -v`` log (read as it stands, even if cut short)."""
    try:
        log = (out / "gpu_tests.log").read_text(errors="replace")
    except OSError:
        return None
    results: dict[str, str] = {}
    for line in log.splitlines():
        m = TEST_LINE.match(line.strip())
        if m:
            results[m.group("id") or m.group("id2")] = m.group("o") or m.group("o2")
    counts: dict[str, int] = {}
    for outcome in results.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    final = [line for line in log.splitlines() if re.match(r"^=+ .*(passed|failed|skipped|error|deselected).* =+$", line)]
    bad = sorted(t for t, o in results.items() if o in ("FAILED", "ERROR"))
    return {"counts": counts, "failed": bad, "final_line": final[-1].strip("= ") if final else None}


def kernels(out: Path) -> dict[str, Any] | None:
    """The kernel rows pivoted to one line per (op, size): each provider's median time and fraction of copy."""
    doc = _json(out / "kernels" / "kernels.json")
    if not doc or not doc.get("rows"):
        return None
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in doc["rows"]:
        prov = str((r.get("extra_info") or {}).get("backend") or r.get("backend"))
        cells.setdefault((str(r["op"]), str(r["size"])), {})[prov] = {
            "median_s": r.get("median"), "gbps": r.get("gbps"), "copy_fraction": r.get("copy_fraction")}
    timers = sorted({str(r.get("timer")) for r in doc["rows"]})
    return {"copy_bandwidth": doc.get("copy_bandwidth"), "timers": timers, "device": doc["env"].get("device_name"),
            "rows": [{"op": op, "size": size, "providers": p} for (op, size), p in sorted(cells.items())]}


def cost(out: Path) -> dict[str, Any]:
    """Per-step cost of every method under each configuration (folders of COST_RUNS that exist)."""
    runs: dict[str, Any] = {}
    for folder, kind in COST_RUNS:
        doc = _json(out / folder / "cost.json")
        if doc:
            runs[f"b{doc['options']['batch_size']} {kind}"] = {"options": doc["options"], "device": doc["env"].get("device_name"),
                             "rows": [{k: r.get(k) for k in ("method", "label", "passes_per_step", "s_per_step", "images_per_s",
                                                             "step_vs_pgd", "step_vs_clean", "peak_mem_bytes", "cuda_graphs")}
                                      for r in doc["rows"]]}
    return runs


def training(out: Path) -> dict[str, Any] | None:
    """The short training runs: epochs, wall time and test accuracies per method."""
    doc = _json(out / "train" / "cost.json")
    if not doc:
        return None
    rows = [{"method": r["method"], "label": r["label"], **r["train"]} for r in doc["rows"] if r.get("train")]
    return {"dataset": doc["data"]["name"], "options": doc["options"], "rows": rows}


def eval_speed(out: Path) -> list[dict[str, Any]] | None:
    """PGD-20 evaluation throughput rows (``benchmarks/eval_speed.py``'s JSON lines in its log)."""
    try:
        text = (out / "eval_speed.log").read_text(errors="replace")
    except OSError:
        return None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "batch" in row:
            rows.append(row)
    return rows


def environment(out: Path) -> dict[str, str]:
    """``key: value`` lines that the env step printed (python, torch, triton, gpu, nvcc, commit)."""
    env: dict[str, str] = {}
    try:
        text = (out / "env.log").read_text(errors="replace")
    except OSError:
        return env
    for line in text.splitlines():
        m = re.match(r"^suite-env (\w+): (.*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip()
    return env


def collect(out: Path) -> dict[str, Any]:
    """Everything the summary reports, as one JSON-ready dict."""
    meta = _json(out / "suite.json") or {}
    return {"suite": meta, "env": environment(out), "steps": steps(out), "gpu_tests": gpu_tests(out),
            "kernels": kernels(out), "cost": cost(out), "training": training(out), "eval_speed": eval_speed(out)}


def _kernel_table(k: dict[str, Any]) -> list[str]:
    provs = [p for p in PROVIDERS if any(p in r["providers"] for r in k["rows"])]
    provs += sorted({p for r in k["rows"] for p in r["providers"]} - set(provs))
    lines = ["| op | size | " + " | ".join(provs) + " |", "|---|---|" + "---:|" * len(provs)]
    for r in k["rows"]:
        cells = []
        for p in provs:
            c = r["providers"].get(p)
            frac = c.get("copy_fraction") if c else None
            cells.append("-" if not c else f"{_us(c['median_s'])}" + (f" ({frac:.0%})" if frac is not None else ""))
        lines.append(f"| {r['op']} | {r['size']} | " + " | ".join(cells) + " |")
    return lines


def _cost_table(runs: dict[str, Any]) -> list[str]:
    heads = list(runs)
    order: list[str] = []
    labels: dict[str, str] = {}
    for run in runs.values():
        for r in run["rows"]:
            if r["method"] not in order:
                order.append(r["method"])
            labels.setdefault(r["method"], r["label"])
    lines = ["| method | passes/step | " + " | ".join(f"{h} ms/step" for h in heads) + " | " +
             " | ".join(f"{h} x PGD" for h in heads) + " |", "|---|---:|" + "---:|" * (2 * len(heads))]
    for m in order:
        by = {h: next((r for r in runs[h]["rows"] if r["method"] == m), None) for h in heads}
        passes = next((r["passes_per_step"] for r in by.values() if r), "-")
        ms = [f"{r['s_per_step'] * 1e3:.1f}" if r and r.get("s_per_step") else "-" for r in by.values()]
        vs = [f"{r['step_vs_pgd']:.2f}" if r and r.get("step_vs_pgd") is not None else "-" for r in by.values()]
        lines.append(f"| {labels[m]} | {passes} | " + " | ".join(ms) + " | " + " | ".join(vs) + " |")
    return lines


def markdown(s: dict[str, Any]) -> str:
    """summary.md: header, step outcomes, then one section per table."""
    meta, env = s["suite"], s["env"]
    dry = meta.get("dry_run")
    lines = [f"# GPU suite{' (CPU dry run: tiny sizes, figures meaningless)' if dry else ''}", "",
             f"- device: {env.get('gpu', '-')}; python {env.get('python', '-')}; torch {env.get('torch', '-')} "
             f"(CUDA {env.get('torch_cuda', '-')}); triton {env.get('triton', '-')}; nvcc {env.get('nvcc', '-')}",
             f"- commit {env.get('commit', '-')}; started {meta.get('started', '-')}; part {meta.get('part', '-')}; "
             f"budget {meta.get('budget_s', '-')} s", "",
             "## Steps", "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r.get('step')} | {r.get('status')} | {r.get('seconds')} |" for r in s["steps"]]
    t = s["gpu_tests"]
    lines += ["", "## GPU tests (`pytest -m gpu`)", ""]
    if t is None:
        lines.append("not run")
    else:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(t["counts"].items())) or "no test outcome in the log"
        lines.append(f"{counts}" + (f" (pytest: {t['final_line']})" if t["final_line"] else " (log cut short)"))
        lines += [f"- FAILED {name}" for name in t["failed"]]
    k = s["kernels"]
    lines += ["", "## Kernels", ""]
    if k is None:
        lines.append("not run")
    else:
        cb = k["copy_bandwidth"] or {}
        lines += [f"{k['device']}; median time per call ({'; '.join(k['timers'])}), in brackets the achieved bandwidth "
                  f"as a fraction of a large copy's, {cb.get('gbps', 0):.0f} GB/s ({cb.get('source', '-')}).", ""]
        lines += _kernel_table(k)
    lines += ["", "## Cost per step", ""]
    if not s["cost"]:
        lines.append("not run")
    else:
        first = next(iter(s["cost"].values()))
        o = first["options"]
        size = f" {o['image_size']}x{o['image_size']}" if o.get("image_size") else ""
        lines += [f"{first['device']}; {o['model']} width {o['width']}, {o['dtype']}, {o['dataset']}{size} images; "
                  f"median of {o['steps']} steps x {o['rounds']} round(s) after {o['warmup']} warm-up; "
                  "graphs: CUDA graphs where the method can be captured; compile: torch.compile "
                  f"({next((r['options'].get('compile_backend') for r in s['cost'].values() if r['options'].get('compile')), '-')}).",
                  ""]
        lines += _cost_table(s["cost"])
    tr = s["training"]
    lines += ["", "## Short training", ""]
    if tr is None:
        lines.append("not run")
    else:
        o = tr["options"]
        lines += [f"{tr['dataset']}, {o['model']} width {o['width']}, batch {o['batch_size']}, {o['dtype']}, "
                  f"{o['train_epochs']} epoch(s); robust accuracy: PGD-20 on the first {o['eval_n']} test images.", "",
                  "| method | epochs | train s | clean acc | robust acc |", "|---|---:|---:|---:|---:|"]
        for r in tr["rows"]:
            rob = r.get("test_robust_acc")
            lines.append(f"| {r['label']} | {r['epochs']} | {r['train_seconds']:.1f} | {r['test_clean_acc']:.4f} | "
                         f"{'-' if rob is None else f'{rob:.4f}'} |")
    ev = s.get("eval_speed")
    lines += ["", "## Evaluation speed (PGD-20 images/s)", ""]
    if not ev:
        lines.append("not run")
    else:
        cols = [c for c in ("fused", "reference", "eager") if any(c in r for r in ev)]
        lines += ["`benchmarks/eval_speed.py` (random weights and images; fused: the default path, CUDA graphs on a GPU; "
                  "reference: the pure-PyTorch pgd_step; eager: no graphs).", "",
                  "| batch | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
        lines += [f"| {r['batch']} | " + " | ".join(f"{r[c]:.0f}" if c in r else "-" for c in cols) + " |" for r in ev]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Write OUTDIR/summary.md and OUTDIR/summary.json; print the markdown."""
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_summary.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    s = collect(out)
    (out / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    md = markdown(s)
    (out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
