"""``apart-fast bench kernels``: runs the op benchmarks of ``benchmarks/`` through pytest-benchmark and turns
its JSON into a per-op table: median time with spread, bytes moved, achieved bandwidth and its fraction of
the device's copy bandwidth measured in the same run, plus device, versions and the command.

What each benchmark records in ``extra_info`` is read leniently (see ``FIELDS``); a benchmark that does not
record the bytes it moves gets no bandwidth. The copy bandwidth is taken from the benchmarks when they
record it (``copy_gbps`` in extra_info, or a benchmark whose op is ``copy``), else measured here with
``torch.Tensor.copy_`` on the same device right after the pytest run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apart_fast.bench.env import REPO_ROOT, environment, timestamp

# extra_info / params keys read for each column, first match wins
FIELDS = {
    "op": ("op", "kernel", "name"),
    "size": ("size", "shape", "numel", "n", "N"),
    "backend": ("backend", "provider", "impl"),
    "provider": ("provider",),
    "mode": ("mode", "direction", "pass"),
    "dtype": ("dtype",),
    "device": ("device",),
    "bytes": ("bytes", "bytes_moved", "nbytes", "io_bytes"),
    "copy_gbps": ("copy_gbps", "copy_GB/s", "copy_bandwidth_gbps", "peak_copy_gbps", "measured_copy_gbps"),
    "peak_mem": ("peak_mem_bytes", "peak_memory_bytes", "peak_mem", "max_memory_allocated"),
}


@dataclass
class KernelOptions:
    """Settings of one ``bench kernels`` invocation."""

    path: str = str(REPO_ROOT / "benchmarks")
    filter: str | None = None  # pytest -k expression
    out: str | None = None
    compare: str | None = None  # an earlier kernels.json (or raw pytest-benchmark JSON)
    fail_on_regression: bool = False
    timeout: float | None = None  # seconds for the pytest run
    pytest_args: list[str] = field(default_factory=list)
    device: str | None = None  # device for the copy-bandwidth measurement; None: what the benchmarks used
    threads: int | None = None  # torch CPU threads in the benchmark process (APART_BENCH_THREADS)


def _pick(keys: tuple[str, ...], *dicts: dict[str, Any]) -> Any:
    for d in dicts:
        for k in keys:
            if d and k in d and d[k] is not None:
                return d[k]
    return None


def parse_benchmark(b: dict[str, Any]) -> dict[str, Any]:
    """One pytest-benchmark record as a row: identity, time statistics (seconds) and what extra_info says.

    Times come from ``extra_info["time_s"]`` where the benchmark timed itself (CUDA events over back-to-back
    calls, see benchmarks/conftest.py), else from pytest-benchmark's own statistics."""
    extra, params = b.get("extra_info") or {}, b.get("params") or {}
    stats = b.get("stats") or {}
    name = b.get("name", "?")
    row: dict[str, Any] = {"name": name, "fullname": b.get("fullname", name), "group": b.get("group")}
    for col, keys in FIELDS.items():
        row[col] = _pick(keys, extra, params) if col != "op" else _pick(("op", "kernel"), extra, params)
    if row["op"] is None:
        row["op"] = b.get("group") or name.split("[")[0].removeprefix("test_")
    if row["provider"] and row["backend"] and row["provider"] != row["backend"]:
        row["backend"] = f"{row['provider']} ({row['backend']})"  # e.g. fused (cpp)
    if isinstance(row["size"], list | tuple):
        row["size"] = "x".join(str(s) for s in row["size"])
    timed = extra.get("time_s") if isinstance(extra.get("time_s"), dict) else None
    for k in ("median", "iqr", "q1", "q3", "min", "max", "mean", "stddev", "rounds"):
        row[k] = (timed if timed is not None and k in timed else stats).get(k)
    row["timer"] = timed.get("timer") if timed is not None else "pytest-benchmark"
    med = row["median"]
    row["gbps"] = row["bytes"] / med / 1e9 if row["bytes"] and med else None
    row["extra_info"] = extra
    return row


def parse_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows from either this command's JSON (``rows``) or pytest-benchmark's raw JSON (``benchmarks``)."""
    if "rows" in doc:
        return doc["rows"]
    return [parse_benchmark(b) for b in doc.get("benchmarks", [])]


def measure_copy_gbps(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Device-to-same-device copy bandwidth (read + write bytes / median time) with ``Tensor.copy_``."""
    nbytes = nbytes or (256 << 20 if device.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i >= 2:
            times.append(dt)
    med = statistics.median(times)
    return {"gbps": 2 * nbytes / med / 1e9, "bytes": 2 * nbytes, "median_s": med, "device": str(device),
            "source": f"measured by bench kernels: Tensor.copy_ of {nbytes >> 20} MiB, median of {repeats}"}


def copy_bandwidth(rows: list[dict[str, Any]], device: torch.device | None) -> dict[str, Any]:
    """The copy bandwidth for the fraction column: recorded by the benchmarks, else measured now."""
    recorded = [r["copy_gbps"] for r in rows if r.get("copy_gbps")]
    if recorded:
        return {"gbps": float(max(recorded)), "source": "measured by the benchmarks' session (extra_info copy bandwidth)"}
    copies = [r["gbps"] for r in rows if r.get("gbps") and str(r.get("op", "")).lower() in ("copy", "memcpy", "clone")]
    if copies:
        return {"gbps": float(max(copies)), "source": "fastest 'copy' benchmark of this run"}
    if device is None:
        used = {str(r.get("device")) for r in rows if r.get("device")}
        cuda = any(u.startswith("cuda") for u in used) or (not used and torch.cuda.is_available())
        device = torch.device("cuda" if cuda else "cpu")
    return measure_copy_gbps(device)


def add_fractions(rows: list[dict[str, Any]], copy_gbps: float | None) -> None:
    """Achieved bandwidth as a fraction of the copy bandwidth."""
    for r in rows:
        r["copy_fraction"] = r["gbps"] / copy_gbps if r.get("gbps") and copy_gbps else None


def is_regression(old: dict[str, Any], new: dict[str, Any], rel: float = 0.05, k: float = 2.0) -> bool:
    """New median beyond the run-to-run spread: > old + k * (old IQR + new IQR) and > (1 + rel) * old."""
    om, nm = old.get("median"), new.get("median")
    if not om or not nm:
        return False
    spread = (old.get("iqr") or 0.0) + (new.get("iqr") or 0.0)
    return nm > om + k * spread and nm > (1 + rel) * om


def is_improvement(old: dict[str, Any], new: dict[str, Any], rel: float = 0.05, k: float = 2.0) -> bool:
    """The mirror of ``is_regression``: faster beyond the spread."""
    return is_regression(new, old, rel, k)


def compare(old_rows: list[dict[str, Any]], new_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Match rows by fullname; list regressions, improvements, and benchmarks present in only one run."""
    old = {r["fullname"]: r for r in old_rows}
    new = {r["fullname"]: r for r in new_rows}
    out: dict[str, Any] = {"regressions": [], "improvements": [], "unchanged": 0,
                           "only_old": sorted(set(old) - set(new)), "only_new": sorted(set(new) - set(old))}
    for name in sorted(set(old) & set(new)):
        o, n = old[name], new[name]
        entry = {"fullname": name, "old_median": o["median"], "new_median": n["median"], "old_iqr": o.get("iqr"),
                 "new_iqr": n.get("iqr"), "ratio": n["median"] / o["median"] if o.get("median") else None}
        if is_regression(o, n):
            out["regressions"].append(entry)
        elif is_improvement(o, n):
            out["improvements"].append(entry)
        else:
            out["unchanged"] += 1
    return out


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per op, size, backend and mode."""
    lines = ["| op | size | backend | mode | dtype | median | IQR | min-max | MB moved | GB/s | of copy | peak MiB |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (str(r["op"]), str(r["size"]), str(r["mode"]), str(r["backend"]))):
        mb = r["bytes"] / 1e6 if r.get("bytes") else None
        peak = r["peak_mem"] / 2**20 if isinstance(r.get("peak_mem"), int | float) else None
        lines.append(
            f"| {r['op']} | {r['size'] if r['size'] is not None else '-'} | {r['backend'] or '-'} | {r['mode'] or '-'} "
            f"| {r['dtype'] or '-'} | {_t(r['median'])} | {_t(r['iqr'])} | {_t(r['min'])}-{_t(r['max'])} | {_num(mb, '.2f')} "
            f"| {_num(r.get('gbps'), '.1f')} | {_num(r.get('copy_fraction'), '.0%')} | {_num(peak, '.1f')} |"
        )
    return "\n".join(lines)


def compare_text(cmp: dict[str, Any]) -> str:
    """Readable summary of ``compare``'s result."""
    lines = [f"compare: {len(cmp['regressions'])} regression(s), {len(cmp['improvements'])} improvement(s), "
             f"{cmp['unchanged']} within spread; {len(cmp['only_old'])} only in old, {len(cmp['only_new'])} only in new"]
    for tag, key in (("REGRESSION", "regressions"), ("faster", "improvements")):
        for e in cmp[key]:
            lines.append(f"  {tag}: {e['fullname']}: {_t(e['old_median'])} -> {_t(e['new_median'])} (x{e['ratio']:.2f})")
    return "\n".join(lines)


def pytest_command(opts: KernelOptions, raw_json: Path) -> list[str]:
    """The pytest invocation, with the same interpreter as this process."""
    cmd = [sys.executable, "-m", "pytest", opts.path, "--benchmark-only", f"--benchmark-json={raw_json}", "-q",
           "-p", "no:cacheprovider"]
    if opts.filter:
        cmd += ["-k", opts.filter]
    return cmd + list(opts.pytest_args)


def run_kernels(opts: KernelOptions) -> tuple[dict[str, Any], int]:
    """Run the benchmarks, write kernels.json / kernels.md / pytest-benchmark.json / pytest.log; return (result, rc)."""
    out = Path(opts.out or f"bench-kernels-{timestamp()}")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "pytest-benchmark.json"
    path = Path(opts.path)
    found = sorted(p.name for p in path.glob("test_*.py")) if path.is_dir() else ([path.name] if path.exists() else [])
    env_device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"env": environment(env_device), "benchmark_files": found, "rows": []}
    if not found:
        result["error"] = (f"no op benchmarks found at {path} (expected benchmarks/test_*.py using the pytest-benchmark "
                           f"'benchmark' fixture); nothing was measured")
        (out / "kernels.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"bench kernels: {result['error']}", file=sys.stderr)
        return result, 1
    cmd = pytest_command(opts, raw)
    result["pytest_command"] = " ".join(cmd)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if opts.threads:
        env.update(APART_BENCH_THREADS=str(opts.threads), OMP_NUM_THREADS=str(opts.threads))
        result["threads"] = opts.threads
    print(f"bench kernels: {' '.join(cmd)}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, log = 124, f"{err.stdout or ''}{err.stderr or ''}\nbench kernels: pytest timed out after {opts.timeout} s"
    result["pytest_seconds"] = time.perf_counter() - t0
    result["pytest_returncode"] = rc
    (out / "pytest.log").write_text(log if isinstance(log, str) else str(log))
    if rc != 0:
        print(log[-3000:], file=sys.stderr)
    if raw.exists():
        doc = json.loads(raw.read_text())
        result["machine_info"] = doc.get("machine_info")
        result["rows"] = parse_rows(doc)
    if not result["rows"]:
        result["error"] = f"pytest exited {rc} and recorded no benchmark (see {out / 'pytest.log'})"
    dev = torch.device(opts.device) if opts.device else None
    result["copy_bandwidth"] = copy_bandwidth(result["rows"], dev) if result["rows"] else None
    add_fractions(result["rows"], result["copy_bandwidth"]["gbps"] if result["copy_bandwidth"] else None)
    status = 0 if rc == 0 and result["rows"] else 1
    if opts.compare:
        old = json.loads(Path(opts.compare).read_text())
        result["compare"] = {"against": opts.compare, **compare(parse_rows(old), result["rows"])}
        if opts.fail_on_regression and result["compare"]["regressions"]:
            status = max(status, 3)
    (out / "kernels.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "kernels.md").write_text(markdown(result))
    result["out"] = str(out)
    return result, status


def markdown(result: dict[str, Any]) -> str:
    """Header (device, versions, command, copy bandwidth) and the table."""
    env = result["env"]
    cb = result.get("copy_bandwidth") or {}
    lines = [f"# bench kernels: {env['device_name']}", "",
             f"- command: `{env['command']}`", f"- pytest: `{result.get('pytest_command', '-')}`",
             f"- torch {env['torch']}, triton {env['triton']}, commit {env['apart_fast_commit']}, "
             f"torch threads {env['torch_threads']}, load {env['load_avg_1_5_15']}"]
    if env.get("mem_clock_mhz"):
        lines.append(f"- GPU memory: clock {env['mem_clock_mhz']} MHz, bus {env.get('bus_width_bits')} bit, "
                     f"theoretical {env.get('theoretical_gbps')} GB/s (nvidia-ml-py)")
    if cb:
        lines.append(f"- copy bandwidth: {cb['gbps']:.1f} GB/s ({cb['source']})")
    timers = sorted({str(r.get("timer")) for r in result["rows"]})
    if timers:
        lines.append(f"- timed by: {'; '.join(timers)}")
    lines += ["", table(result["rows"]), "",
              "GB/s counts the bytes each op must move once; above 100% of copy the working set sits in cache."]
    if "compare" in result:
        lines += ["", "```", compare_text(result["compare"]), "```"]
    return "\n".join(lines) + "\n"
