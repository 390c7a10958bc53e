"""Smoke tests: each bench command runs on a tiny size and writes valid JSON; the --compare logic on hand-made
records. Timings themselves are never asserted."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from apart_fast.bench import kernels
from apart_fast.bench.cost import CostOptions, run_cost
from apart_fast.bench.env import REPO_ROOT
from apart_fast.cli import main

FAKE_BENCH = '''
import torch

def test_fake_op(benchmark):
    x = torch.ones(1024)
    benchmark.extra_info.update(op="fake", size=1024, backend="torch", mode="fwd", dtype="fp32",
                                bytes=2 * x.numel() * 4, peak_mem_bytes=8192, device="cpu")
    benchmark(torch.neg, x)

def test_other_op(benchmark):
    benchmark(lambda: None)
'''


def test_cost_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cost"
    rc = main(["bench", "cost", "--model", "smallcnn", "--width", "4", "--dataset", "synthetic", "--synthetic-n", "64",
               "--batch-size", "16", "--warmup", "1", "--steps", "2", "--methods", "clean,apart,pgd", "--pgd-steps", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "cost.json").read_text())
    for key in ("env", "options", "config", "data", "timing", "memory", "rows", "claims"):
        assert key in doc
    for key in ("device_name", "torch", "triton", "cpu_model", "torch_threads", "command", "load_avg_1_5_15"):
        assert key in doc["env"]
    assert [r["method"] for r in doc["rows"]] == ["clean", "apart", "pgd"]
    for r in doc["rows"]:
        for key in ("passes_per_step", "s_per_step", "s_per_epoch", "step_vs_pgd", "step_vs_clean", "peak_mem_bytes"):
            assert r[key] is not None, key
        assert r["step_s"]["n"] == 2 and r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
    by = {r["method"]: r for r in doc["rows"]}
    assert by["pgd"]["step_vs_pgd"] == 1.0 and by["clean"]["step_vs_clean"] == 1.0
    assert by["apart"]["passes_per_step"] == 2 and by["pgd"]["passes_per_step"] == 3
    assert by["clean"]["steps_per_epoch"] == 64 // 16
    md = (out / "cost.md").read_text()
    assert "| APART | 2 |" in md and "x PGD (step)" in md
    assert by["apart"]["launches_per_step"] > by["clean"]["launches_per_step"] > 0 and "| launches |" in md
    assert (out / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| clean |" in capsys.readouterr().out


def test_cost_free_epoch_division(tmp_path: Path) -> None:

    res = run_cost(CostOptions(methods=["free"], model="smallcnn", width=4, synthetic_n=64, batch_size=16, warmup=0,
                               steps=1, free_replays=2, epoch_size=128, out=str(tmp_path), progress=False))
    r = res["rows"][0]
    assert r["passes_per_step"] == 2 and r["epoch_divisor"] == 2 and r["steps_per_epoch"] == 8
    assert r["s_per_update"] == pytest.approx(r["s_per_step"] / 2)
    assert r["s_per_epoch"] == pytest.approx(r["s_per_step"] * 8 / 2)
    assert r["step_vs_pgd"] is None


def test_cost_bf16_runs_through_engine_autocast(tmp_path: Path) -> None:
    res = run_cost(CostOptions(methods=["apart"], model="smallcnn", width=4, synthetic_n=64, batch_size=16, warmup=0,
                               steps=1, epoch_size=64, dtype="bf16", out=str(tmp_path), progress=False))
    assert res["rows"][0]["s_per_step"] > 0


def test_cost_rejects_bad_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "cost", "--methods", "clean,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_kernels_smoke_fake_benchmarks(tmp_path: Path) -> None:
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "test_fake_bench.py").write_text(textwrap.dedent(FAKE_BENCH))
    out = tmp_path / "out"
    rc = main(["bench", "kernels", "--path", str(bench_dir), "--filter", "fake_op", "--out", str(out), "--device", "cpu",
               "--pytest-arg=--benchmark-min-rounds=3", "--pytest-arg=--benchmark-max-time=0.01"])
    assert rc == 0, (out / "pytest.log").read_text()
    doc = json.loads((out / "kernels.json").read_text())
    assert doc["env"]["torch"] and doc["copy_bandwidth"]["gbps"] > 0 and "-k fake_op" in doc["pytest_command"]
    (row,) = doc["rows"]  # the filter left one benchmark
    assert (row["op"], row["size"], row["backend"], row["mode"], row["bytes"], row["peak_mem"]) == (
        "fake", 1024, "torch", "fwd", 8192, 8192)
    assert row["median"] > 0 and row["gbps"] > 0 and row["copy_fraction"] > 0
    assert "| fake | 1024 | torch | fwd |" in (out / "kernels.md").read_text()
    # comparing a run with itself finds no regression
    rc = main(["bench", "kernels", "--path", str(bench_dir), "--filter", "fake_op", "--out", str(tmp_path / "again"),
               "--device", "cpu", "--compare", str(out / "kernels.json")])
    assert json.loads((tmp_path / "again" / "kernels.json").read_text())["compare"]["only_old"] == []


def test_kernels_without_benchmarks(tmp_path: Path) -> None:
    assert main(["bench", "kernels", "--path", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no op benchmarks" in json.loads((tmp_path / "o" / "kernels.json").read_text())["error"]


@pytest.mark.skipif(not (REPO_ROOT / "benchmarks" / "test_ops_bench.py").exists(), reason="op benchmarks not written yet")
def test_kernels_smoke_real_benchmarks(tmp_path: Path) -> None:
    rc = main(["bench", "kernels", "--filter", "pgd_step and eager and 128x3x32x32", "--out", str(tmp_path), "--threads", "1",
               "--pytest-arg=--benchmark-min-rounds=1", "--pytest-arg=--benchmark-max-time=0.01", "--timeout", "300"])
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert rc == 0, (tmp_path / "pytest.log").read_text()
    (row,) = doc["rows"]
    assert row["op"] == "pgd_step" and row["size"] == "128x3x32x32" and row["median"] > 0
    assert row["bytes"] > 0 and row["copy_fraction"] > 0 and "benchmarks" in doc["copy_bandwidth"]["source"]


def _rec(name: str, median: float, iqr: float) -> dict:
    return {"fullname": name, "median": median, "iqr": iqr}


def test_compare_flags_only_beyond_spread() -> None:
    old = [_rec("a", 1.0, 0.01), _rec("b", 1.0, 0.2), _rec("c", 1.0, 0.0), _rec("d", 1.0, 0.0), _rec("gone", 1.0, 0.0)]
    new = [_rec("a", 1.2, 0.01),  # slower by far more than 2x the spread and 5%: regression
           _rec("b", 1.3, 0.2),  # 30% slower but within 2*(0.2+0.2): noise
           _rec("c", 1.04, 0.0),  # beyond a zero spread but under 5%: noise
           _rec("d", 0.5, 0.0),  # faster
           _rec("new", 1.0, 0.0)]
    cmp = kernels.compare(old, new)
    assert [e["fullname"] for e in cmp["regressions"]] == ["a"]
    assert cmp["regressions"][0]["ratio"] == pytest.approx(1.2)
    assert [e["fullname"] for e in cmp["improvements"]] == ["d"]
    assert cmp["unchanged"] == 2 and cmp["only_old"] == ["gone"] and cmp["only_new"] == ["new"]
    assert "REGRESSION: a" in kernels.compare_text(cmp)


def test_compare_reads_raw_pytest_benchmark_json(tmp_path: Path) -> None:
    raw = {"benchmarks": [{"name": "test_x[torch-1024]", "fullname": "b.py::test_x[torch-1024]", "group": None,
                           "params": {"backend": "torch", "n": 1024}, "extra_info": {"bytes": 8000},
                           "stats": {"median": 2e-6, "iqr": 1e-7, "min": 1e-6, "max": 3e-6, "q1": 1.9e-6, "q3": 2e-6}}]}
    (row,) = kernels.parse_rows(raw)
    assert (row["op"], row["backend"], row["size"]) == ("x", "torch", 1024)
    assert row["gbps"] == pytest.approx(4.0)
    slower = [dict(row, median=4e-6)]
    assert len(kernels.compare(kernels.parse_rows(raw), slower)["regressions"]) == 1


def test_gpu_suite_shell_syntax() -> None:
    script = REPO_ROOT / "benchmarks" / "gpu_suite.sh"
    assert script.exists()
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_cost_train_eval(tmp_path: Path) -> None:

    res = run_cost(CostOptions(methods=["clean", "apart"], model="smallcnn", width=4, synthetic_n=64, batch_size=16,
                               warmup=0, steps=1, train_epochs=1, eval=True, eval_n=16, out=str(tmp_path), progress=False))
    for r in res["rows"]:
        t = r["train"]
        assert 0 <= t["test_clean_acc"] <= 1 and 0 <= t["test_robust_acc"] <= 1 and t["test_n"] == 16
    assert "| APART | 1 |" in (tmp_path / "cost.md").read_text().split("passes over data")[1]
    assert (tmp_path / "runs" / "apart" / "results.json").exists()


def test_cost_writes_the_timings_before_counting_launches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch count that never returns (the profiler started after a CUDA-graph capture can hang) loses no timing:
    cost.json already holds the timed rows when the count starts."""
    from apart_fast.bench import cost

    def hang(self):  # noqa: ANN001, ANN202
        doc = json.loads((tmp_path / "cost.json").read_text())
        assert [r["method"] for r in doc["rows"]] == ["clean"] and doc["rows"][0]["s_per_step"] > 0
        assert "launches_per_step" not in doc["rows"][0]
        raise TimeoutError("the profiler hung")

    monkeypatch.setattr(cost._Timed, "launches", hang)
    with pytest.raises(TimeoutError):
        run_cost(CostOptions(methods=["clean"], model="smallcnn", width=4, synthetic_n=64, batch_size=16, warmup=0,
                             steps=1, out=str(tmp_path), progress=False))


def test_cost_compile_reports_frames_recompiles_and_graph_breaks(tmp_path: Path) -> None:
    res = run_cost(CostOptions(methods=["clean", "apart"], model="smallcnn", width=4, synthetic_n=64, batch_size=16,
                               warmup=1, steps=2, compile=True, compile_backend="aot_eager", out=str(tmp_path), progress=False))
    for r in res["rows"]:
        c = r["compile"]
        assert c["frames_first_step"] > 0 and c["frames_later"] >= 0 and c["graphs"] > 0, c
        assert c["graph_breaks"] == sum(n for _, n in c["graph_break_reasons"])
    # APART's pass 1 records its sites outside the compiled graph (PerturbSite._record): at least one break per site
    assert res["rows"][1]["compile"]["graph_breaks"] >= 2
    assert "disable" in res["rows"][1]["compile"]["graph_break_reasons"][0][0]
