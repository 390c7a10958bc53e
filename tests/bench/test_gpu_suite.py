"""benchmarks/gpu_suite.sh rehearsed on the CPU (``--dry-run``: every step, tiny sizes, the same summary), and
the summary's parsing of what a cut-short GPU call leaves behind."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apart_fast.bench.env import REPO_ROOT

SUITE = REPO_ROOT / "benchmarks" / "gpu_suite.sh"


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", REPO_ROOT / "benchmarks" / "gpu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=path)


@pytest.mark.gpuimage
def test_dry_run_runs_every_step_and_fills_every_table(tmp_path: Path) -> None:
    out, export = tmp_path / "suite", tmp_path / "export"
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", "--export", str(export), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=3300)
    steps = (out / "steps.tsv").read_text() if (out / "steps.tsv").exists() else "no steps.tsv"
    assert proc.returncode == 0, f"{steps}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    s = json.loads((export / "summary.json").read_text())
    names = ["env", "install", "info", "precompile", "gpu_tests", "cost_b128", "kernels", "cost_b128_eager", "train",
             "eval_speed", "cost_b512", "cost_b128_compile"]
    assert [r["step"] for r in s["steps"]] == names and {r["status"] for r in s["steps"]} == {"ok"}
    assert s["suite"]["dry_run"] is True and s["env"]["torch"] and s["env"]["gpu"] == "none (CPU)"
    # the GPU plan: every step planned, the sum within the 570 s budget of one 10-minute call, printed with the command
    assert list(s["suite"]["plan"]) == names and sum(s["suite"]["plan"].values()) == s["suite"]["planned_s"] <= 570
    assert f"= {s['suite']['planned_s']} s of the 570 s budget" in proc.stdout
    assert 'run(command="SUITE_COMMIT=' in proc.stdout and "timeout_s=600)" in proc.stdout
    assert s["precompile"]["count"] == 1 and s["precompile"]["errors"] == 0
    assert s["gpu_tests"]["counts"].get("skipped", 0) > 0 and not s["gpu_tests"]["failed"]
    ops = {r["op"] for r in s["kernels"]["rows"]}
    assert {"copy", "perturb_init", "sign_step+bwd", "pack_sign", "layer_perturb", "omega_update"} <= ops
    assert all(r["size"] == "2x3x8x8" for r in s["kernels"]["rows"]) and s["kernels"]["copy_bandwidth"]["gbps"] > 0
    assert list(s["cost"]) == ["b16 graphs", "b32 graphs", "b16 eager", "b16 graphs+compile"]
    for name, run in s["cost"].items():
        methods = ["clean", "apart"] if name.endswith("compile") else ["clean", "fgsm_rs", "pgd", "apart"]
        assert [r["method"] for r in run["rows"]] == methods
        assert all(r["s_per_step"] > 0 and r["backend"] == "cpp" for r in run["rows"])
        assert all(r["cuda_graphs"] == (not name.endswith("eager")) for r in run["rows"])
    compiled = s["cost"]["b16 graphs+compile"]
    assert compiled["options"]["compile_backend"] == "aot_eager" and set(compiled["compile"]) == {"clean", "APART"}
    assert [r["method"] for r in s["training"]["rows"]] == ["pgd", "apart"]
    ev = s["eval_speed"]
    assert [r["batch"] for r in ev] == [16] and ev[0]["fused"] > 0 and ev[0]["backend"] == "cpp" and ev[0]["capture_s"] >= 0
    md = (export / "summary.md").read_text()
    assert "| b16 graphs | APART | cpp | yes | 2 |" in md and "| b16 eager | PGD-2 | cpp | no | 3 |" in md
    assert "| copy | 2x3x8x8 (launch-bound) |" in md and "frames compiled at the first step" in md
    assert (export / "logs.tar.gz").stat().st_size > 0


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    for args, msg in ((["--part", "c", str(tmp_path)], "--part c; use a, b or all"), ([], "give the output folder"),
                      (["--nope", str(tmp_path)], "unknown option --nope")):
        proc = subprocess.run(["bash", str(SUITE), *args], env=_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr


def test_summary_reads_plain_and_xdist_test_logs_even_cut_short(tmp_path: Path) -> None:
    mod = _summary_module()
    (tmp_path / "gpu_tests.log").write_text(
        "tests/ops/test_triton.py::test_a[fp32] PASSED [ 10%]\n"
        "tests/ops/test_triton.py::test_b FAILED [ 20%]\n"
        "[gw1] [ 30%] PASSED tests/engine/test_graphs.py::test_c[apart] \n"
        "[gw0] [ 40%] SKIPPED tests/engine/test_run_setup.py::test_d \n"
        "[gw2] [ 50%] ERROR tests/data/test_data_loader.py::test_e \n")
    t = mod.gpu_tests(tmp_path)
    assert t["counts"] == {"passed": 2, "failed": 1, "skipped": 1, "error": 1} and t["final_line"] is None
    assert t["failed"] == ["tests/data/test_data_loader.py::test_e", "tests/ops/test_triton.py::test_b"]
    (tmp_path / "steps.tsv").write_text("step\tstatus\trc\tseconds\tlog\ngpu_tests\tTIMEOUT\t124\t90\tgpu_tests.log\n")
    md = mod.markdown(mod.collect(tmp_path))
    assert "| gpu_tests | TIMEOUT | 90 |" in md and "(log cut short)" in md and "- FAILED tests/ops/test_triton.py::test_b" in md
    assert md.count("not run") == 5  # precompile, kernels, cost, training and eval speed: absent, said so
    assert "commit not recorded" in md


def test_summary_marks_launch_bound_rows_and_a_missing_commit(tmp_path: Path) -> None:
    """A kernel row whose bytes move in under 10 us at the copy bandwidth says it is launch-bound; a copy without
    git metadata says so instead of printing a dash."""
    mod = _summary_module()
    (tmp_path / "kernels").mkdir()
    rows = [{"op": "sign_step", "size": size, "backend": "cuda", "median": med, "bytes": nbytes, "gbps": nbytes / med / 1e9,
             "copy_fraction": 0.5, "timer": "cuda events"} for size, nbytes, med in
            (("128x3x32x32", 7.9e6, 8e-6), ("16M", 3.4e8, 1.4e-4))]
    (tmp_path / "kernels" / "kernels.json").write_text(json.dumps(
        {"rows": rows, "copy_bandwidth": {"gbps": 4000.0, "source": "copy"}, "env": {"device_name": "H200"}}))
    (tmp_path / "suite.json").write_text(json.dumps({"commit": "unknown: no git metadata in this copy (pass SUITE_COMMIT)"}))
    md = mod.markdown(mod.collect(tmp_path))
    assert "| sign_step | 128x3x32x32 (launch-bound) |" in md and "| sign_step | 16M |" in md
    assert "commit unknown: no git metadata in this copy" in md
