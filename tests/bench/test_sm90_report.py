"""benchmarks/sm90_report.py: every Triton kernel specialisation the package can launch compiles for sm_90 under this
venv's Triton (the GPU image's Triton 3.6 and the CUDA extension run in ``make test-gpuimage``), a compile error
makes it exit 1, and ptxas's logs are read right."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from apart_fast.bench.env import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "sm90_report.py"


def _module():
    spec = importlib.util.spec_from_file_location("sm90_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass resolves annotations through the module
    saved = os.environ.get("TRITON_INTERPRET")
    spec.loader.exec_module(mod)  # it unsets TRITON_INTERPRET for its own compiles: put it back for the other tests
    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved
    return mod


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN5apart4cuda12_GLOBAL__N_110map_kernelILi8ENS1_7StepBwdIN3c104HalfELb1EEEEEvT0_l' for 'sm_90'
ptxas info    : Function properties for _ZN5apart4cuda12_GLOBAL__N_110map_kernelILi8ENS1_7StepBwdIN3c104HalfELb1EEEEEvT0_l
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 128 bytes smem, 456 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    24 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_ptxas_logs_are_parsed() -> None:
    mod = _module()
    entries = mod.split_ptxas(PTXAS_LOG)
    assert [name for name, _ in entries] == [
        "_ZN5apart4cuda12_GLOBAL__N_110map_kernelILi8ENS1_7StepBwdIN3c104HalfELb1EEEEEvT0_l", "_Z1kv"]
    assert mod.parse_ptxas(entries[0][1]) == {"registers": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 128}
    assert mod.parse_ptxas(entries[1][1]) == {"registers": 255, "stack": 24, "spill_stores": 8, "spill_loads": 16, "smem": None}
    assert mod.short_name("void apart::cuda::(anonymous namespace)::map_kernel<8, apart::cuda::(anonymous namespace)::"
                          "StepBwd<c10::Half, true> >(apart::cuda::(anonymous namespace)::StepBwd<c10::Half, true>, long)") \
        == "map_kernel<8, StepBwd<Half, true> >"


@pytest.mark.slow
def test_every_triton_specialisation_compiles_for_sm90(tmp_path: Path) -> None:
    """All launch configurations of every kernel in kernels/, compiled for sm_90 by this venv's Triton (about two
    minutes on two busy cores): no compile error, ptxas's registers for each, every kernel covered."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--no-nvcc", "--jobs", str(os.cpu_count() or 1), "--out",
                           str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "sm90.json").read_text())
    t = doc["triton"]
    assert t["errors"] == 0 and t["count"] >= 200, (t["errors"], t["count"])
    assert all(r["registers"] and r["registers"] > 0 for r in t["rows"])
    import apart_fast.kernels as K

    # every module of the package, not only those other tests happened to import first
    mods = [importlib.import_module(f"{K.__name__}.{info.name}") for info in pkgutil.iter_modules(K.__path__)]
    kernels = {name for m in mods for name in vars(m) if name.endswith("_kernel")}
    assert kernels and kernels == {s["kernel"] for s in t["summary"]}
    assert "| _sign_step_bwd_kernel |" in (tmp_path / "sm90.md").read_text()


def test_a_kernel_that_fails_to_compile_fails_the_report(tmp_path: Path) -> None:
    """A planted kernel that Triton cannot compile (a tensor shape that is not a power of two) is an error row and
    exit status 1."""
    planted = tmp_path / "planted.py"
    planted.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import sm90_report as S
        import torch, triton, triton.language as tl

        @triton.jit
        def _broken_kernel(x_ptr):
            tl.store(x_ptr + tl.arange(0, 3), 1.0)

        def cases():
            return [("broken fp32", lambda K: _broken_kernel[(1,)](torch.empty(4)))]

        S.cases = cases
        with S._fresh_cache():
            sys.exit(S.main(["--no-nvcc", "--out", {str(tmp_path)!r}]))
    """))
    proc = subprocess.run([sys.executable, str(planted)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "sm90.json").read_text())
    assert doc["triton"]["errors"] == 1 and doc["triton"]["rows"][0]["kernel"] == "broken"
    assert "| broken | broken fp32 | ERROR |" in proc.stdout
