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


LAUNCH_BOUND_S = 10e-6  # a row whose bytes take less than this at the copy bandwidth measures launches, not bandwidth


def kernels(out: Path) -> dict[str, Any] | None:
    """The kernel rows pivoted to one line per (op, size): each provider's median time and fraction of copy, and
    whether the size is launch-bound (its bytes would move in under ``LAUNCH_BOUND_S`` at the copy bandwidth)."""
    doc = _json(out / "kernels" / "kernels.json")
    if not doc or not doc.get("rows"):
        return None
    copy_gbps = (doc.get("copy_bandwidth") or {}).get("gbps")
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    moved: dict[tuple[str, str], float] = {}
    for r in doc["rows"]:
        prov = str((r.get("extra_info") or {}).get("backend") or r.get("backend"))
        key = (str(r["op"]), str(r["size"]))
        cells.setdefault(key, {})[prov] = {"median_s": r.get("median"), "gbps": r.get("gbps"),
                                           "copy_fraction": r.get("copy_fraction")}
        if r.get("bytes"):
            moved[key] = float(r["bytes"])
    timers = sorted({str(r.get("timer")) for r in doc["rows"]})
    rows = [{"op": op, "size": size, "providers": p,
             "launch_bound": bool(copy_gbps and (op, size) in moved and moved[op, size] / (copy_gbps * 1e9) < LAUNCH_BOUND_S)}
            for (op, size), p in sorted(cells.items())]
    return {"copy_bandwidth": doc.get("copy_bandwidth"), "timers": timers, "device": doc["env"].get("device_name"),
            "rows": rows}


def cost(out: Path) -> dict[str, Any]:
    """Per-step cost of every method under each configuration (folders of COST_RUNS that exist)."""
    runs: dict[str, Any] = {}
    for folder, kind in COST_RUNS:
        doc = _json(out / folder / "cost.json")
        if doc:
            runs[f"b{doc['options']['batch_size']} {kind}"] = {
                "options": doc["options"], "device": doc["env"].get("device_name"),
                "compile": {r["label"]: r["compile"] for r in doc["rows"] if r.get("compile")},
                "rows": [{k: r.get(k) for k in ("method", "label", "passes_per_step", "s_per_step", "images_per_s", "step_vs_pgd",
                                                "step_vs_clean", "peak_mem_bytes", "cuda_graphs", "backend", "launches_per_step")}
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


def precompile(out: Path) -> dict[str, Any] | None:
    """The sm_90 precompile (``benchmarks/sm90_report.py`` on this machine): counts, errors, spills, compile seconds."""
    doc = _json(out / "sm90" / "sm90.json")
    if not doc or "triton" not in doc:
        return None
    t = doc["triton"]
    return {k: t.get(k) for k in ("count", "errors", "spilling", "seconds", "wall_s", "jobs")} | {
        "triton": doc.get("versions_triton"), "errors_list": [r["spec"] for r in t.get("rows", []) if r.get("error")]}


def collect(out: Path) -> dict[str, Any]:
    """Everything the summary reports, as one JSON-ready dict."""
    meta = _json(out / "suite.json") or {}
    return {"suite": meta, "env": environment(out), "steps": steps(out), "precompile": precompile(out),
            "gpu_tests": gpu_tests(out), "kernels": kernels(out), "cost": cost(out), "training": training(out),
            "eval_speed": eval_speed(out)}


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
        size = f"{r['size']} (launch-bound)" if r.get("launch_bound") else r["size"]
        lines.append(f"| {r['op']} | {size} | " + " | ".join(cells) + " |")
    return lines


def _cost_table(runs: dict[str, Any]) -> list[str]:
    """One line per run and method: the op backend and whether the step ran as a CUDA graph, beside its cost."""
    lines = ["| run | method | backend | graphs | passes/step | ms/step | x PGD | x clean | launches |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        for r in run["rows"]:
            ms = f"{r['s_per_step'] * 1e3:.1f}" if r.get("s_per_step") else "-"
            vs = [f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("step_vs_pgd", "step_vs_clean")]
            lines.append(f"| {name} | {r['label']} | {r.get('backend') or '-'} | {'yes' if r.get('cuda_graphs') else 'no'} | "
                         f"{r.get('passes_per_step', '-')} | {ms} | {vs[0]} | {vs[1]} | {r.get('launches_per_step') or '-'} |")
    return lines


def _compile_lines(runs: dict[str, Any]) -> list[str]:
    """What torch.compile did in each compiled run: frames compiled at the first step and after it (recompiles),
    graphs and graph breaks with their most frequent reasons."""
    lines = []
    for name, run in runs.items():
        for method, c in (run.get("compile") or {}).items():
            reasons = "; ".join(f"{n}x {why}" for why, n in c.get("graph_break_reasons", [])[:3])
            lines.append(f"- {name}, {method}: {c.get('frames_first_step')} frames compiled at the first step, "
                         f"{c.get('frames_later')} after it (recompiles), {c.get('graphs')} graphs, "
                         f"{c.get('graph_breaks')} graph breaks" + (f" ({reasons})" if reasons else ""))
    return lines


def markdown(s: dict[str, Any]) -> str:
    """summary.md: header, step outcomes, then one section per table."""
    meta, env = s["suite"], s["env"]
    dry = meta.get("dry_run")
    lines = [f"# GPU suite{' (CPU dry run: tiny sizes, figures meaningless)' if dry else ''}", "",
             f"- device: {env.get('gpu', '-')}; python {env.get('python', '-')}; torch {env.get('torch', '-')} "
             f"(CUDA {env.get('torch_cuda', '-')}); triton {env.get('triton', '-')}; nvcc {env.get('nvcc', '-')}",
             f"- commit {meta.get('commit', 'not recorded')}; started {meta.get('started', '-')}; part {meta.get('part', '-')}; "
             f"budget {meta.get('budget_s', '-')} s; planned on the GPU {meta.get('planned_s', '-')} s of "
             f"{meta.get('gpu_budget_s', '-')} s", "",
             "## Steps", "", "| step | status | seconds | planned on the GPU |", "|---|---|---:|---:|"]
    plan = meta.get("plan") or {}
    lines += [f"| {r.get('step')} | {r.get('status')} | {r.get('seconds')} | {plan.get(r.get('step'), '-')} |" for r in s["steps"]]
    pc = s.get("precompile")
    lines += ["", "## sm_90 precompile (`benchmarks/sm90_report.py`)", ""]
    if pc is None:
        lines.append("not run")
    else:
        lines.append(f"Triton {pc['triton']}: {pc['count']} specialisations compiled for sm_90, {pc['errors']} errors, "
                     f"{pc['spilling']} with spills; {pc['seconds']:.1f} s of compiling on {pc['jobs']} processes "
                     f"({pc['wall_s']:.1f} s wall), written to the Triton cache the GPU tests read.")
        lines += [f"- ERROR {spec}" for spec in pc["errors_list"]]
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
                  f"as a fraction of a large copy's, {cb.get('gbps', 0):.0f} GB/s ({cb.get('source', '-')}). Launch-bound: "
                  f"the op's bytes would move in under {LAUNCH_BOUND_S * 1e6:.0f} us at that bandwidth, so the time is "
                  "mostly launch latency, not bandwidth (the >= 85% of copy target is read at 16M elements).", ""]
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
        compiled = _compile_lines(s["cost"])
        if compiled:
            lines += ["", "torch.compile:", *compiled]
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
        lines += ["`benchmarks/eval_speed.py` (random weights and images; fused: the default path, CUDA graphs on a GPU, "
                  "timing replays of graphs captured by an earlier call; capture s: that earlier call's extra seconds "
                  "(warm-ups and capture); reference: the pure-PyTorch pgd_step; eager: no graphs).", "",
                  "| batch | backend | " + " | ".join(cols) + " | capture s |", "|---:|---|" + "---:|" * (len(cols) + 1)]
        for r in ev:
            cap = f"{r['capture_s']:.2f}" if r.get("capture_s") is not None else "-"
            speeds = " | ".join(f"{r[c]:.0f}" if c in r else "-" for c in cols)
            lines.append(f"| {r['batch']} | {r.get('backend', '-')} | {speeds} | {cap} |")
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
