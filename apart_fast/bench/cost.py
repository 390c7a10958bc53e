"""``apart-fast bench cost``: seconds per training step and per epoch of every method on one model, data,
batch, precision and device, relative to PGD-10 and to clean training; optionally trained and evaluated.

Timing: each method gets its own ``Run`` (the engine's data, model, method and optimizer), ``warmup``
untimed steps, then ``steps`` timed steps of ``method.step(batch)``; batches are drawn from the run's
``DeviceLoader`` outside the timed region (drawing costs the same for every method). On CUDA the device
is synchronised before and after each step. With ``rounds > 1`` the methods are timed round-robin,
``steps`` each per round, so a change in machine load hits every method alike.

A Free step replays its batch m times (m optimizer updates); its E-epoch run makes ceil(E/m) passes
over the data, so its cost per epoch of training budget is step time x steps per pass / m.

Memory (``bench.memory``): on CUDA, ``torch.cuda.max_memory_allocated`` from building the Run to the last timed step,
less what was allocated before; on the CPU, the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before building the Run) less its RSS before — both include the Run's model,
optimizer, method state (APART's per-example store) and the dataset's device copy.

Launches: after timing, one more step of each method runs under torch.profiler and its kernel
launches are counted (``bench.launches``: kernel-launching leaf aten calls on the CPU, CUDA kernels
and copies on a GPU), so a launch-count regression shows in the table beside ms/step. The timings are
written (cost.json, cost.md) before that count, and on a GPU the profiler is started once before any
Run exists: its first start after a CUDA-graph capture can hang on some CUDA versions, and a hang then
loses nothing measured.

With ``--compile``, ``torch._dynamo``'s counters give each method's frames compiled at its first step and
after it (recompiles), its graphs and its graph breaks (with their reasons), in cost.json's ``compile``.

This module measures; cost.md and cost.png are drawn by ``report/cost.py``.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apart_fast.bench.env import environment, timestamp
from apart_fast.bench.launches import count_launches
from apart_fast.bench.memory import PeakMemory
from apart_fast.config import METHODS, ApartConfig, Config, ConfigError
from apart_fast.data import Batch, ImageData, load_dataset
from apart_fast.report.cost import CLAIMS, LABELS, markdown, plot

# Benchmark precision -> the engine's --amp mode (autocast around the forward passes; fp16 loss-scaled).
DTYPES = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
DEFAULT_METHODS = ("clean", "fgsm_rs", "nfgsm", "gradalign", "free", "pgd", "apart")
@dataclass
class CostOptions:
    """Settings of one ``bench cost`` invocation (times in steps, sizes in examples)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    model: str = "preact18"
    width: int | None = 16
    stem: str = "native"  # torchvision: models: native or cifar (Config.stem)
    batch_size: int = 128
    dataset: str = "synthetic"
    data_dir: str | None = None
    image_size: int | None = None  # synthetic only: resize the 16x16 patterns to this side (e.g. 32 for CIFAR's)
    synthetic_n: int = 1024  # synthetic only: training examples
    epoch_size: int | None = None  # examples per epoch for s/epoch; None: the dataset's training set
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "auto"
    warmup: int = 3  # untimed steps per method
    steps: int = 10  # timed steps per method and round
    rounds: int = 1  # round-robin repetitions over the methods
    pgd_steps: int = 10
    free_replays: int = 8
    seed: int = 0
    train_epochs: int = 0  # > 0: also train each method this many epochs
    eval: bool = False  # with train_epochs: PGD-20 and clean accuracy on the test split
    eval_n: int | None = None  # evaluate on the first eval_n test examples only
    out: str | None = None
    progress: bool = True
    cuda_graphs: bool | None = None  # None: the engine's default (on for CUDA where the method can be captured)
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation)
    ema: float | None = None  # every method also updates a weight average with this decay after each step

    def validate(self) -> CostOptions:
        """Raise ConfigError on the first bad value."""
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"--methods {','.join(self.methods)}: unknown {bad}; choose from {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}; choose one of {', '.join(DTYPES)}")
        for name in ("steps", "rounds", "batch_size", "synthetic_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        if self.warmup < 0 or self.train_epochs < 0:
            raise ConfigError("--warmup and --train-epochs must be >= 0")
        if self.eval and self.train_epochs < 1:
            raise ConfigError("--eval evaluates the trained models; pass --train-epochs E (E >= 1) with it")
        if self.image_size is not None and (self.dataset != "synthetic" or self.image_size < 4):
            raise ConfigError("--image-size resizes the synthetic data only; pass --dataset synthetic and a side >= 4")
        if self.epoch_size is not None and self.epoch_size < self.batch_size:
            raise ConfigError(f"--epoch-size {self.epoch_size} is smaller than one batch ({self.batch_size})")
        return self


def load_bench_data(opts: CostOptions) -> ImageData:
    """The dataset of the benchmark; synthetic data optionally resized (bilinear) to ``image_size``."""
    data = load_dataset(opts.dataset, opts.data_dir, seed=opts.seed, synthetic_size=opts.synthetic_n)
    if opts.image_size is not None and data.image_size != (opts.image_size, opts.image_size):
        def resize(x: torch.Tensor) -> torch.Tensor:
            y = F.interpolate(x.float(), size=(opts.image_size, opts.image_size), mode="bilinear", align_corners=False)
            return y.round().clamp(0, 255).to(torch.uint8)

        data = ImageData(data.name, resize(data.train_x), data.train_y, resize(data.test_x), data.test_y, data.classes,
                         pad=max(1, opts.image_size // 8), flip=data.flip)
    return data


def method_config(opts: CostOptions, method: str, epochs: int = 1, apart: dict[str, Any] | None = None) -> Config:
    """The engine Config of one method under the benchmark's shared settings (``apart``: ApartConfig overrides)."""
    return Config(method=method, dataset=opts.dataset, data_dir=opts.data_dir, model=opts.model, width=opts.width, stem=opts.stem,
                  batch_size=opts.batch_size, epochs=epochs, pgd_steps=opts.pgd_steps, free_replays=opts.free_replays,
                  device=opts.device, seed=opts.seed, backend=opts.backend, amp=DTYPES[opts.dtype],
                  cuda_graphs=opts.cuda_graphs, compile=opts.compile,
                  compile_backend=opts.compile_backend, ema=opts.ema, apart=ApartConfig(**(apart or {}))).validate()


def _batches(loader: Any) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch, forever."""
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min, max and mean of per-step seconds."""
    ts = sorted(times)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = ts[0]
    return {"median": statistics.median(ts), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": ts[0], "max": ts[-1],
            "mean": statistics.fmean(ts), "n": len(ts)}


class _Timed:
    """One method's Run, its batch stream and its collected step times."""

    def __init__(self, opts: CostOptions, method: str, data: ImageData, device: torch.device, name: str | None = None,
                 apart: dict[str, Any] | None = None) -> None:
        from apart_fast.engine.run import Run

        self.name, self.device = name or method, device
        n_train = int(data.train_x.shape[0])
        per_pass = n_train // opts.batch_size
        divisor = opts.free_replays if method == "free" else 1
        total = opts.warmup + opts.steps * opts.rounds
        # enough epochs that the lr schedule spans every measured step (it only sets lr and momentum)
        cfg = method_config(opts, method, epochs=divisor * max(1, math.ceil(total / max(per_pass, 1))), apart=apart)
        self.memory = PeakMemory(device)
        self.memory.start()
        self.run = Run(cfg, data=data)
        self.stream = _batches(self.run.loader)
        self.times: list[float] = []
        self.peak_bytes: int | None = None
        self.last: dict[str, torch.Tensor] = {}
        self.compiled = opts.compile
        self.dynamo: list[dict[str, Any]] = []  # counters before the first step, after it, after the last

    def steps(self, count: int, record: bool, bar: tqdm) -> None:
        cuda = self.device.type == "cuda"
        # The engine's own step: the BatchNorm/fault guard, and the CUDA-graph replay where the run captures.
        step = self.run.stepper if self.run.stepper is not None else self.run.step
        for _ in range(count):
            batch = next(self.stream)
            if self.compiled and not self.dynamo:
                self.dynamo.append(_dynamo_counters())
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.last = step(batch)[0]
            if cuda:
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            if self.compiled and len(self.dynamo) == 1:
                self.dynamo.append(_dynamo_counters())
            if record:
                self.times.append(dt)
            bar.update(1)
        if self.compiled:
            self.dynamo[2:] = [_dynamo_counters()]

    def compile_report(self) -> dict[str, Any]:
        """Frames compiled at the first step and after it (recompiles), graphs and graph breaks of this method's steps."""
        first, after_first, last = self.dynamo[0], self.dynamo[1], self.dynamo[-1]
        breaks = {k: v - first["graph_break"].get(k, 0) for k, v in last["graph_break"].items()}
        breaks = {k: v for k, v in breaks.items() if v > 0}
        return {"frames_first_step": after_first["frames"] - first["frames"], "frames_later": last["frames"] - after_first["frames"],
                "graphs": last["graphs"] - first["graphs"], "graph_breaks": sum(breaks.values()),
                "graph_break_reasons": [(k.strip().splitlines()[0][:160], v) for k, v in sorted(breaks.items(), key=lambda kv: -kv[1])]}

    def launches(self) -> dict[str, Any]:
        """Kernel launches of one more (untimed) step of the engine, under the profiler."""
        step = self.run.stepper if self.run.stepper is not None else self.run.step
        batch = next(self.stream)
        return count_launches(lambda: step(batch), self.device)

    def finish_memory(self) -> None:
        if self.peak_bytes is None:
            self.peak_bytes = self.memory.peak()


def _dynamo_counters() -> dict[str, Any]:
    """torch._dynamo's running totals: frames compiled, graphs, graph breaks by reason."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
            "graph_break": dict(counters["graph_break"])}


def measure(opts: CostOptions, data: ImageData, variants: dict[str, tuple[str, dict[str, Any]]] | None = None,
            save: Callable[[list[dict[str, Any]], str], None] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Time every method (round-robin over ``rounds``); one row per method and the memory measure's name.
    ``variants``: more rows, name -> (method, ApartConfig overrides), e.g. APART's ablations.
    ``save(rows, memory_kind)`` is called with the timed rows before the launches are counted."""
    from apart_fast.engine.device import resolve_device

    device = resolve_device(opts.device)
    if device.type == "cuda":  # start the profiler (Kineto) once before any capture: see the module docstring
        count_launches(lambda: torch.empty(1, device=device).zero_(), device)
    todo = [(m, m, None) for m in opts.methods] + [(name, m, over) for name, (m, over) in (variants or {}).items()]
    total = len(todo) * (opts.warmup + opts.steps * opts.rounds)
    bar = tqdm(total=total, desc="bench cost", unit="step", disable=not opts.progress, dynamic_ncols=True)
    timed: list[_Timed] = []
    if device.type == "cpu":  # one throwaway step first, so one-time library allocations do not count as memory
        prime = _Timed(opts, opts.methods[0], data, device)
        prime.steps(1, record=False, bar=tqdm(disable=True))
        del prime
        if opts.compile:
            torch._dynamo.reset()  # the first method compiles afresh: its compile report counts its own frames
    try:
        for name, m, over in todo:  # round 1 builds each Run in turn and measures its memory
            bar.set_description(f"bench cost: {name}")
            t = _Timed(opts, m, data, device, name=name, apart=over)
            t.steps(opts.warmup, record=False, bar=bar)
            t.steps(opts.steps, record=True, bar=bar)
            t.finish_memory()
            timed.append(t)
        for r in range(1, opts.rounds):
            for t in timed:
                bar.set_description(f"bench cost: {t.name} (round {r + 1})")
                t.steps(opts.steps, record=True, bar=bar)
    finally:
        bar.close()
    rows = _rows(opts, data, timed)
    kind = timed[0].memory.kind if timed else ""
    if save is not None:
        save(rows, kind)
    for r, t in zip(rows, timed):
        n = t.launches()
        r.update(launches_per_step=n["total"], launch_kind=n["kind"], launches_by_op=n["by_op"])
        del t.run
    timed.clear()
    gc.collect()
    return rows, kind


def _rows(opts: CostOptions, data: ImageData, timed: list[_Timed]) -> list[dict[str, Any]]:
    """One row per timed method: step time statistics, per-epoch cost, memory, ratios; launches come later."""
    device = timed[0].device if timed else torch.device(opts.device)
    n_train = int(data.train_x.shape[0])
    epoch_size = opts.epoch_size or n_train
    rows = []
    for t in timed:
        method = t.run.method
        stats = summarize(t.times)
        divisor = int(method.data_passes_divisor)
        steps_per_pass = epoch_size // opts.batch_size
        loss = t.last.get("loss")
        n = t.last.get("n")
        rows.append({
            "method": t.name,
            "label": LABELS.get(t.name, t.name) + (f"-{opts.pgd_steps}" if t.name == "pgd" else ""),
            "passes_per_step": int(method.passes),
            "updates_per_step": divisor,  # optimizer updates (Free: m replays)
            "step_s": stats,
            "step_times_s": list(t.times),  # every timed step, in order
            "round_medians": [statistics.median(t.times[i:i + opts.steps]) for i in range(0, len(t.times), opts.steps)],
            "s_per_step": stats["median"],
            "images_per_s": opts.batch_size * divisor / stats["median"],  # training images through an update
            "cuda_graphs": bool(t.run.graphs),
            "s_per_update": stats["median"] / divisor,  # Free: per replay-batch
            "steps_per_epoch": steps_per_pass,
            "epoch_divisor": divisor,
            "s_per_epoch": stats["median"] * steps_per_pass / divisor,
            "peak_mem_bytes": t.peak_bytes,
            "last_loss": float(loss) / float(n) if loss is not None and n is not None else None,
            "backend": _resolved_backend(opts.backend, device),
        })
        if t.compiled:
            rows[-1]["compile"] = t.compile_report()
    _add_ratios(rows)
    return rows


def _resolved_backend(backend: str, device: torch.device) -> str:
    try:
        from apart_fast.ops import dispatch

        return dispatch.resolve(backend, device)
    except Exception:  # the ops layer may not expose dispatch; record what was asked for
        return backend


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Step and epoch time relative to PGD-k's and to clean's (None where that method was not run)."""
    by = {r["method"]: r for r in rows}
    for ref in ("pgd", "clean"):
        base = by.get(ref)
        for r in rows:
            r[f"step_vs_{ref}"] = r["s_per_step"] / base["s_per_step"] if base else None
            r[f"epoch_vs_{ref}"] = r["s_per_epoch"] / base["s_per_epoch"] if base else None


def train_and_eval(opts: CostOptions, data: ImageData, out: Path) -> dict[str, dict[str, Any]]:
    """Train each method ``train_epochs`` epochs through the engine; clean and PGD-20 test accuracy with --eval."""
    from apart_fast.engine.loop import train

    eval_data = data
    if opts.eval_n is not None:
        eval_data = copy.copy(data)
        eval_data.test_x, eval_data.test_y = data.test_x[: opts.eval_n], data.test_y[: opts.eval_n]
    results = {}
    for m in opts.methods:
        cfg = method_config(opts, m, epochs=opts.train_epochs)
        cfg.out = str(out / "runs" / m)
        if not opts.eval:
            cfg.final_eval_steps, cfg.eval_n = 0, 0
        res = train(cfg, overwrite=True, progress=opts.progress, data=eval_data)
        results[m] = {k: res[k] for k in ("epochs", "train_seconds", "test_clean_acc", "test_robust_acc", "test_n", "eval")}
        results[m]["train_s_per_epoch"] = res["train_seconds"] / opts.train_epochs
        del res
        gc.collect()
    return results


def run_cost(opts: CostOptions) -> dict[str, Any]:
    """Measure, optionally train, and write cost.md, cost.json and cost.png into ``opts.out``."""
    from apart_fast.engine.device import auto_device

    opts.device = auto_device(opts.device)
    opts.validate()
    out = Path(opts.out or f"bench-cost-{timestamp()}")
    out.mkdir(parents=True, exist_ok=True)
    data = load_bench_data(opts)
    env = environment(opts.device)

    def result_of(rows: list[dict[str, Any]], mem_kind: str) -> dict[str, Any]:
        result = {
            "env": env,
            "options": asdict(opts),
            "config": method_config(opts, opts.methods[0]).to_dict(),
            "data": {"name": data.name, "n_train": int(data.train_x.shape[0]), "image_size": list(data.image_size),
                     "channels": data.channels, "epoch_size": opts.epoch_size or int(data.train_x.shape[0])},
            "timing": "median of per-step wall time after warm-up; data drawing excluded"
                      + ("; torch.cuda.synchronize before and after each step" if env["device"].startswith("cuda") else ""),
            "memory": mem_kind,
            "rows": rows,
            "claims": claims(rows),
        }
        (out / "cost.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "cost.md").write_text(markdown(result))
        return result

    rows, mem_kind = measure(opts, data, save=result_of)  # written once timed, again with the launches
    env["load_avg_after_timing"] = _load()
    trained = train_and_eval(opts, data, out) if opts.train_epochs else {}
    for r in rows:
        if r["method"] in trained:
            r["train"] = trained[r["method"]]
    result = result_of(rows, mem_kind)
    plot(result, out / "cost.png")
    result["out"] = str(out)
    return result


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def claims(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Step time of each ``CLAIMS`` method relative to its reference: medians, paired per round, fastest steps."""
    by = {r["method"]: r for r in rows}
    out: dict[str, float | None] = {}
    for m, ref in CLAIMS:
        a, b = by.get(m), by.get(ref)
        out[f"{m}_step_vs_{ref}"] = a["s_per_step"] / b["s_per_step"] if a and b else None
        # fastest step against fastest step: what is left when other processes slow some steps down
        out[f"{m}_step_vs_{ref}_min"] = a["step_s"]["min"] / b["step_s"]["min"] if a and b else None
        # paired: median over rounds of the ratio of the two methods' medians in that round (timed seconds apart)
        out[f"{m}_step_vs_{ref}_paired"] = (
            statistics.median(x / y for x, y in zip(a["round_medians"], b["round_medians"])) if a and b else None)
    return out
