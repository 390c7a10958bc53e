"""Kernel launches of one eager training step on the CPU, split by where they come from: the step's
primitives (fault guard, both optimizers, both schedules: apart_fast/step/) against the rest.

``python benchmarks/step_launches.py [--methods clean,apart] [--width 8] [--batch-size 32]`` profiles the
engine's own step (``Run.step``: BatchNorm guard, method step, keep-or-undo) of PreAct ResNet-18 on
32x32 synthetic images after two warm-up steps, and prints the launches (kernel-launching leaf aten
calls, ``apart_fast.bench.launches``) per source function. The issue-12 target: the step primitives
issue at most 20 per APART step, whatever the model's size.
"""

from __future__ import annotations

import argparse

import torch

from apart_fast.bench.cost import CostOptions, load_bench_data, method_config
from apart_fast.bench.launches import count_launches
from apart_fast.engine.run import Run

STEP_PRIMITIVES = "step/"  # apart_fast/step/: guard.py, optim.py, schedule.py, amp.py, distributed.py


def measure(method: str, width: int, batch: int, graphs: bool = False) -> dict:
    """Launch counts of one eager CPU step of ``method`` (PreAct-18, ``width``, ``batch``); ``graphs``: the
    capturable step's code (DeviceSGD, DeviceSchedule, keep-or-undo by torch.where as on a GPU), run eagerly."""
    opts = CostOptions(methods=[method], width=width, batch_size=batch, image_size=32, synthetic_n=4 * batch, progress=False,
                       cuda_graphs=graphs or None)
    cfg = method_config(opts, method, epochs=4)
    run = Run(cfg, data=load_bench_data(opts))  # graphs: the engine keeps or undoes sync-free, as on a GPU
    batches = iter(run.loader)
    run.model.train()
    for _ in range(2):
        run.step(next(batches))
    batch_ = next(batches)
    return count_launches(lambda: run.step(batch_), torch.device("cpu"), stacks=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="clean,apart")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--graphs", action="store_true", help="the capturable step's code path (as on a GPU), run eagerly")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = "capturable (DeviceSGD, DeviceSchedule, torch.where)" if args.graphs else "eager (FusedSGD, CyclicSchedule)"
    print(f"PreAct-18 width {args.width}, batch {args.batch_size}, 32x32, CPU, {path}, torch {torch.__version__}")
    for m in args.methods.split(","):
        res = measure(m, args.width, args.batch_size, args.graphs)
        prim = {k: v for k, v in res["by_source"].items() if k.startswith(STEP_PRIMITIVES)}
        print(f"\n{m}: {res['total']} launches per step ({res['kind']}); step primitives: {sum(prim.values())}")
        for src, n in res["by_source"].items():
            print(f"  {n:5d}  {src}")


if __name__ == "__main__":
    main()
