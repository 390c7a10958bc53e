"""Every Triton kernel specialisation apart_fast can launch, and every kernel of its CUDA extension, compiled for sm_90
(H100/H200) on a machine without a GPU: registers, spills, shared memory and compile seconds per kernel.

Triton: the kernels' host wrappers (``kernels/*.py``, the functions ``apart_fast.ops`` dispatches to) are called on CPU
tensors standing in for CUDA ones, once per data dtype (fp32/fp16/bf16; the Triton backend takes no fp64), step-size
shape and dtype (0-d or (1,), fp32 or fp64), optional incoming gradient, size class (a multiple of 16 elements or
not, a 16-byte aligned pointer or not, one element), layout (NCHW, channels_last) and, for the omega kernels, every
tile shape their wrapper picks (image widths 1 to 1024). The one device-dependent choice of the wrappers
(``_utils.rounds_bound``: pgd_step's eps stays fp32 on CUDA) is answered as on CUDA, and the clamp-gradient
convention is the installed torch's. Each launch compiles instead of running (Triton's JIT warm-up, with the
specialisation Triton itself derives from the arguments: signature, constexprs, 16-byte alignment and divisibility)
for ``GPUTarget("cuda", 90, 32)`` through a stand-in driver; ptxas's ``-v`` log gives registers and spills, the
compiled kernel its shared memory. CUDA: ``nvcc --cubin -arch=sm_90 -Xptxas -v`` of ``csrc/perturb_cuda.cu`` with the
installed torch's headers.

    python benchmarks/sm90_report.py [--out DIR] [--jobs N] [--cache-dir DIR] [--only TEXT] [--no-nvcc] [--no-triton]

Writes DIR/sm90.json and DIR/sm90.md (prints the markdown). Exit status 1 when a kernel fails to compile; a spill
is reported, not failed. ``--cache-dir`` copies the compiled kernels into a Triton cache (``TRITON_CACHE_DIR``): the
keys are those of real launches on an sm_90 device, so the GPU suite warms the cache with it before the GPU tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET = ("cuda", 90, 32)  # H100/H200: compute capability 9.0, warp 32
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")


@dataclasses.dataclass
class Row:
    """One compiled kernel: a Triton specialisation or a CUDA extension kernel."""

    kernel: str
    spec: str
    registers: int | None = None
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    seconds: float | None = None
    error: str | None = None


def parse_ptxas(log: str) -> dict[str, int | None]:
    """Registers, stack frame, spill stores/loads and shared memory (bytes) from one kernel's ``ptxas -v`` lines."""
    used, spill, smem = PTXAS_USED.search(log), PTXAS_SPILL.search(log), PTXAS_SMEM.search(log)
    return {"registers": int(used.group(1)) if used else None,
            "stack": int(spill.group(1)) if spill else None,
            "spill_stores": int(spill.group(2)) if spill else None,
            "spill_loads": int(spill.group(3)) if spill else None,
            "smem": int(smem.group(1)) if smem else None}


def split_ptxas(log: str) -> list[tuple[str, str]]:
    """``(mangled name, its lines)`` for every entry function of an ``nvcc -Xptxas -v`` log."""
    parts = PTXAS_ENTRY.split(log)
    return [(parts[i], parts[i + 2]) for i in range(1, len(parts) - 2, 3)]


def short_name(demangled: str) -> str:
    """``apart::cuda::(anonymous namespace)::map_kernel<8, ...StepBwd<c10::Half, true>>(...)`` ->
    ``map_kernel<8, StepBwd<Half, true>>``: no namespaces, no parameter list."""
    name = demangled.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not name[i:].startswith("(anonymous"):
            name = name[:i]
            break
    for ns in ("apart::cuda::(anonymous namespace)::", "apart::cuda::", "apart::", "c10::", "at::"):
        name = name.replace(ns, "")
    return name.replace(", OpMathType<BFloat16>::type", "").replace(", OpMathType<Half>::type", "")


# ---------------------------------------------------------------------------------------------------- Triton

def _tensor(n: int, dtype: Any, kind: str = "aligned") -> Any:
    """A dense CPU tensor of ``n`` elements: fresh (16-byte aligned), or a view one element into its storage."""
    import torch

    if kind == "offset":
        return torch.rand(n + 1).to(dtype)[1:]
    return torch.rand(n).to(dtype)


def cases() -> list[tuple[str, Callable[[Any], None]]]:
    """``(label, call)`` for every launch configuration; ``call(K)`` runs the wrapper of ``K`` (the kernels module)."""
    import torch

    dts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    steps = [((), torch.float32), ((1,), torch.float32), ((), torch.float64), ((1,), torch.float64)]
    eps = 8 / 255
    out: list[tuple[str, Callable[[Any], None]]] = []

    def elementwise(dn: str, n: int, kind: str, all_steps: bool) -> None:
        dt = dts[dn]

        def t() -> Any:
            return _tensor(n, dt, kind)

        for shape, sdt in steps if all_steps else steps[:1]:
            a_name = f"a{'0d' if not shape else '1'}-{str(sdt).removeprefix('torch.')}"

            def a(shape: tuple = shape, sdt: Any = sdt) -> Any:
                return torch.full(shape, 0.01, dtype=sdt)

            where = f"{dn} n={n} {kind} {a_name}"
            out.append((f"perturb_init_fwd {where}", lambda K, a=a: K.perturb_init_fwd(t(), t(), a(), eps)))
            out.append((f"sign_step_fwd {where}", lambda K, a=a: K.sign_step_fwd(t(), t(), t(), a(), eps)))
            for gd in (True, False):
                w = f"{where} grad_d={int(gd)}"
                out.append((f"perturb_init_bwd {w}",
                            lambda K, a=a, gd=gd: K.perturb_init_bwd(t(), t() if gd else None, t(), t(), a(), eps)))
                out.append((f"sign_step_bwd {w}",
                            lambda K, a=a, gd=gd: K.sign_step_bwd(t(), t() if gd else None, t(), t(), t(), a(), eps)))
            out.append((f"layer_perturb_fwd {where}",
                        lambda K, a=a: K.layer_perturb_fwd(t(), _tensor(n, torch.int8, kind), a())))
        where = f"{dn} n={n} {kind}"
        out.append((f"layer_perturb_bwd {where}", lambda K: K.layer_perturb_bwd(t(), _tensor(n, torch.int8, kind))))
        out.append((f"pack_sign {where}", lambda K: K.pack_sign(t())))
        out.append((f"pgd_step {where}", lambda K: K.pgd_step(t(), t(), t(), 2 / 255, eps)))

    for dn in dts:
        for n in (8192, 4099):  # a multiple of 16 elements (the usual image batch) or not
            elementwise(dn, n, "aligned", all_steps=True)
    elementwise("fp32", 4099, "offset", all_steps=False)  # pointers off 16-byte alignment (a view one element in)
    elementwise("fp32", 1, "aligned", all_steps=False)  # one element: Triton specialises an integer 1

    def omega(dn: str, c: int, h: int, w: int, pad: int, layout: str, all_ratios: bool) -> None:
        dt = dts[dn]
        b, n = 4, 6
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format

        def frame() -> Any:
            return torch.rand(b, c, h, w).to(dt).contiguous(memory_format=fmt)

        def window() -> tuple:
            store = torch.rand(n, c, h + 2 * pad, w + 2 * pad).to(dt).contiguous(memory_format=fmt)
            index = torch.tensor([0, 3, 0, 5])
            crop = torch.randint(0, 2 * pad + 1, (b, 2))
            return store, index, crop, torch.tensor([True, False, True, False]), torch.tensor([0, 1, 0, 3])

        where = f"{dn} {c}x{h}x{w} pad {pad} {layout}"
        out.append((f"omega_gather {where}", lambda K: K.omega_gather(*window(), h, w)))
        for shape, sdt in steps if all_ratios else steps[:1]:
            r = f"ratio{'0d' if not shape else '1'}-{str(sdt).removeprefix('torch.')}"
            out.append((f"omega_update {where} {r}",
                        lambda K, shape=shape, sdt=sdt: K.omega_update(*window(), frame(), torch.full(shape, 0.5, dtype=sdt))))

    for dn in dts:
        for layout in ("nchw", "cl"):
            omega(dn, 1, 8, 8, 1, layout, all_ratios=True)  # digits
            omega(dn, 3, 32, 32, 4, layout, all_ratios=True)  # CIFAR
    for w in (1, 2, 4, 16, 64, 128, 256, 512, 1024):  # the other tile shapes (BLOCK_W = next power of 2, <= 1024)
        omega("fp32", 3, 2, w, 1, "nchw", all_ratios=False)
    return out


class _Driver:
    """Triton's driver interface, as far as a JIT warm-up needs it, for an sm_90 device that is not there."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*TARGET)


def _setup(rows: list[Row], labels: list[str]) -> Any:
    """Point Triton at the sm_90 stand-in, make every launch a compile-only warm-up and record each compile into
    ``rows`` (``labels[-1]`` names the case being run); returns the kernels module."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction, KernelInterface

    driver.set_active(_Driver())

    def launch(self: Any, grid: Any) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    original = JITFunction._do_compile

    def do_compile(self: Any, key: Any, signature: dict, device: Any, constexprs: dict, options: Any, attrs: dict,
                   *args: Any, **kwargs: Any) -> Any:
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):  # TRITON_DUMP_PTXAS_LOG prints ptxas's -v log
            kernel = original(self, key, signature, device, constexprs, options, attrs, *args, **kwargs)
        rows.append(Row(self.fn.__name__, _spec(self, signature, constexprs, attrs, labels[-1]),
                        seconds=round(time.perf_counter() - t0, 3), **{**parse_ptxas(buf.getvalue()),
                                                                        "smem": kernel.metadata.shared}))
        return kernel

    KernelInterface.__getitem__ = launch
    JITFunction._do_compile = do_compile
    import apart_fast.kernels as K

    for mod in list(sys.modules.values()):  # as for CUDA tensors: pgd_step's eps stays fp32 (_utils.rounds_bound)
        if getattr(mod, "__name__", "").startswith("apart_fast.kernels") and hasattr(mod, "rounds_bound"):
            mod.rounds_bound = lambda data, rounded: False
    return K


def _spec(fn: Any, signature: dict, constexprs: dict, attrs: dict, case: str) -> str:
    """The specialisation in words: the case that launched it, then what Triton keys it on: the argument types,
    the constexprs (BLOCK_SIZE is always 1024) and the arguments specialised as 16-divisible."""
    names = fn.arg_names
    types = " ".join(t for t in signature.values() if t != "constexpr")
    consts = [f"{names[path[0]]}={getattr(v, 'name', v)}" for path, v in sorted(constexprs.items())
              if names[path[0]] != "BLOCK_SIZE"]
    div16 = [names[p[0]] for p, a in attrs.items() if a]
    return f"{case} | {types} | {' '.join(consts)} | 16-divisible: {','.join(div16) or '-'}"


def _run_cases(job: int, jobs: int, only: str | None = None) -> list[Row]:
    """Worker ``job`` of ``jobs``: its share of ``cases()`` (those whose label contains ``only``, if given); a case
    that fails to compile is a row with the error."""
    rows: list[Row] = []
    labels = [""]
    K = _setup(rows, labels)
    picked = [(label, call) for label, call in cases() if only is None or only in label]
    for i, (label, call) in enumerate(picked):
        if i % jobs != job:
            continue
        labels.append(label)
        try:
            call(K)
        except Exception as err:  # a compile error: reported, and the report exits 1
            rows.append(Row(label.split()[0], label, error=f"{type(err).__name__}: {str(err).strip()[:2000]}"))
    return rows


def triton_report(jobs: int, only: str | None = None) -> list[Row]:
    """Compile every case (whose label contains ``only``) with ``jobs`` processes; one row per distinct
    specialisation (and per failed case)."""
    if jobs == 1:
        rows = _run_cases(0, 1, only)
    else:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            rows = [r for part in pool.starmap(_run_cases, [(j, jobs, only) for j in range(jobs)]) for r in part]
    seen: dict[tuple[str, str], Row] = {}
    for r in rows:  # one per specialisation: the compile that ran ptxas (another process may have hit the disk cache)
        key = (r.kernel, r.spec.split(" | ", 1)[-1] if r.error is None else r.spec)
        if key not in seen or seen[key].registers is None:
            seen[key] = r
    return sorted(seen.values(), key=lambda r: (r.kernel, r.spec))


# ---------------------------------------------------------------------------------------------------- CUDA (nvcc)

def nvcc_report() -> tuple[list[Row], float, str]:
    """Per-kernel ptxas resources of ``csrc/perturb_cuda.cu`` for sm_90, compile seconds, and the nvcc version."""
    import torch
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    nvcc = Path(home) / "bin" / "nvcc"
    aten = Path(cpp_extension.include_paths()[0]) / "ATen" / "ATen.h"
    std = "c++20" if "C++20" in aten.read_text() else "c++17"  # what the installed torch's headers require
    cmd = [str(nvcc), "--cubin", "-arch=sm_90", "-Xptxas", "-v", "-O3", f"-std={std}", *cpp_extension.COMMON_NVCC_FLAGS,
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C_cuda",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")), f"-I{Path(home) / 'include'}",
           str(ROOT / "csrc" / "perturb_cuda.cu"), "-o", os.devnull]
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return [Row("perturb_cuda.cu", "nvcc", error=(proc.stderr or proc.stdout)[-4000:])], seconds, version
    entries = split_ptxas(proc.stderr + proc.stdout)
    names = [m for m, _ in entries]
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    rows = [Row(short_name(n), "sm_90", **parse_ptxas(log)) for n, (_, log) in zip(names, entries)]
    return sorted(rows, key=lambda r: r.kernel), seconds, version


# ---------------------------------------------------------------------------------------------------- report

def _summary(rows: list[Row]) -> list[dict[str, Any]]:
    """Per kernel: specialisations, register range, largest stack/spill/smem, compile seconds (sum, max)."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        if r.error is None:
            by.setdefault(r.kernel, []).append(r)
    out = []
    for k, rs in sorted(by.items()):
        regs = [r.registers for r in rs if r.registers is not None]
        out.append({"kernel": k, "specialisations": len(rs), "registers_min": min(regs, default=None),
                    "registers_max": max(regs, default=None), "stack_max": max((r.stack or 0 for r in rs), default=0),
                    "spill_bytes_max": max(((r.spill_stores or 0) + (r.spill_loads or 0) for r in rs), default=0),
                    "smem_max": max((r.smem or 0 for r in rs), default=0),
                    "seconds_sum": round(sum(r.seconds or 0.0 for r in rs), 2),
                    "seconds_max": max((r.seconds or 0.0 for r in rs), default=0.0)})
    return out


def markdown(doc: dict[str, Any]) -> str:
    """The report's tables: Triton per kernel and per specialisation, CUDA extension per kernel."""
    lines = [f"# sm_90 compile report ({doc['target']})", "", f"- {doc['versions']}", ""]
    t = doc.get("triton")
    if t is not None:
        lines += [f"## Triton {doc['versions_triton']}: {t['count']} specialisations, {t['errors']} compile errors, "
                  f"{t['spilling']} with spills; {t['seconds']:.1f} s of compiling ({t['jobs']} process(es), "
                  f"{t['wall_s']:.1f} s wall)", "",
                  "| kernel | specialisations | registers | stack B | spills B | smem B | compile s (sum / max) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for s in t["summary"]:
            regs = f"{s['registers_min']}-{s['registers_max']}" if s["registers_min"] != s["registers_max"] else f"{s['registers_max']}"
            lines.append(f"| {s['kernel']} | {s['specialisations']} | {regs} | {s['stack_max']} | {s['spill_bytes_max']} | "
                         f"{s['smem_max']} | {s['seconds_sum']:.1f} / {s['seconds_max']:.2f} |")
        lines += ["", "| kernel | specialisation (case \\| argument types \\| constexprs \\| 16-divisible args) | registers "
                  "| spills B | smem B | compile s |", "|---|---|---:|---:|---:|---:|"]
        for r in t["rows"]:
            if r["error"]:
                lines.append(f"| {r['kernel']} | {r['spec']} | ERROR | | | {r['error'].splitlines()[0][:200]} |")
            else:
                spills = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
                lines.append(f"| {r['kernel']} | {r['spec'].replace('|', chr(92) + '|')} | {r['registers']} | {spills} | "
                             f"{r['smem']} | {r['seconds']} |")
    c = doc.get("cuda")
    if c is not None:
        lines += ["", f"## CUDA extension (`csrc/perturb_cuda.cu`, {c['nvcc']}): {len(c['rows'])} kernels, "
                  f"{c['errors']} errors; nvcc {c['seconds']:.1f} s", "",
                  "| kernel | registers | stack B | spill stores / loads B | smem B |", "|---|---:|---:|---:|---:|"]
        for r in c["rows"]:
            if r["error"]:
                lines.append(f"| {r['kernel']} | ERROR: {r['error'].strip().splitlines()[-1][:300]} | | | |")
            else:
                lines.append(f"| {r['kernel']} | {r['registers']} | {r['stack']} | {r['spill_stores']} / {r['spill_loads']} | "
                             f"{r['smem'] if r['smem'] is not None else 0} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for sm90.json and sm90.md (default: print only)")
    ap.add_argument("--jobs", type=int, default=1, help="compiling processes")
    ap.add_argument("--cache-dir", default=None, help="also copy the compiled kernels into this Triton cache")
    ap.add_argument("--no-nvcc", action="store_true", help="skip the CUDA extension")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--only", default=None, help="only the cases whose label contains this text (e.g. 'bf16')")
    args = ap.parse_args(argv)
    import torch

    doc: dict[str, Any] = {"target": f"GPUTarget{TARGET}, sm_90", "versions": f"torch {torch.__version__}"}
    failed = False
    if not args.no_triton:
        import triton

        doc["versions_triton"] = triton.__version__
        t0 = time.perf_counter()
        rows = triton_report(max(args.jobs, 1), args.only)
        errors = [r for r in rows if r.error]
        failed |= bool(errors)
        doc["triton"] = {"count": len(rows) - len(errors), "errors": len(errors), "jobs": args.jobs,
                         "spilling": sum(1 for r in rows if (r.spill_stores or 0) + (r.spill_loads or 0) > 0),
                         "seconds": sum(r.seconds or 0.0 for r in rows), "wall_s": time.perf_counter() - t0,
                         "summary": _summary(rows), "rows": [dataclasses.asdict(r) for r in rows]}
        if args.cache_dir:
            shutil.copytree(os.environ["TRITON_CACHE_DIR"], args.cache_dir, dirs_exist_ok=True)
    if not args.no_nvcc:
        rows, seconds, version = nvcc_report()
        failed |= any(r.error for r in rows)
        doc["cuda"] = {"nvcc": version, "seconds": seconds, "errors": sum(1 for r in rows if r.error),
                       "rows": [dataclasses.asdict(r) for r in rows]}
    md = markdown(doc)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sm90.json").write_text(json.dumps(doc, indent=1))
        (out / "sm90.md").write_text(md)
    print(md)
    return 1 if failed else 0


@contextlib.contextmanager
def _fresh_cache() -> Iterator[None]:
    """A new, empty Triton cache for this process and its workers: every kernel compiles, so ptxas logs each one."""
    with tempfile.TemporaryDirectory(prefix="sm90-triton-cache-") as d:
        os.environ["TRITON_CACHE_DIR"] = d
        yield


# Before Triton is first imported (here and in spawned workers): compile for the GPU, not the interpreter.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

if __name__ == "__main__":
    with _fresh_cache():
        code = main()
    sys.exit(code)
