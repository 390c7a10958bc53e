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


@pytest.mark.slow
def test_dry_run_runs_every_step_and_fills_every_table(tmp_path: Path) -> None:
    out, export = tmp_path / "suite", tmp_path / "export"
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", "--export", str(export), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=1800)
    steps = (out / "steps.tsv").read_text() if (out / "steps.tsv").exists() else "no steps.tsv"
    assert proc.returncode == 0, f"{steps}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    s = json.loads((export / "summary.json").read_text())
    names = ["env", "install", "info", "gpu_tests", "kernels", "cost_b128", "cost_b512", "cost_b128_eager", "train",
             "eval_speed", "cost_b128_compile"]
    assert [r["step"] for r in s["steps"]] == names and {r["status"] for r in s["steps"]} == {"ok"}
    assert s["suite"]["dry_run"] is True and s["env"]["torch"] and s["env"]["gpu"] == "none (CPU)"
    assert s["gpu_tests"]["counts"].get("skipped", 0) > 0 and not s["gpu_tests"]["failed"]
    ops = {r["op"] for r in s["kernels"]["rows"]}
    assert {"copy", "perturb_init", "sign_step+bwd", "pack_sign", "layer_perturb", "omega_update"} <= ops
    assert all(r["size"] == "2x3x8x8" for r in s["kernels"]["rows"]) and s["kernels"]["copy_bandwidth"]["gbps"] > 0
    assert list(s["cost"]) == ["b16 graphs", "b32 graphs", "b16 eager", "b16 graphs+compile"]
    for run in s["cost"].values():
        assert [r["method"] for r in run["rows"]] == ["clean", "fgsm_rs", "pgd", "apart"]
        assert all(r["s_per_step"] > 0 for r in run["rows"])
    assert s["cost"]["b16 graphs+compile"]["options"]["compile_backend"] == "aot_eager"
    assert [r["method"] for r in s["training"]["rows"]] == ["pgd", "apart"]
    assert [r["batch"] for r in s["eval_speed"]] == [16] and s["eval_speed"][0]["fused"] > 0
    md = (export / "summary.md").read_text()
    assert "| APART | 2 |" in md and "| copy | 2x3x8x8 |" in md and "| PGD-2 | 1 |" in md
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
    assert md.count("not run") == 4  # kernels, cost, training and eval speed: absent, said so
