"""One guarded SGD update of PreAct ResNet-18's parameters on the CPU: ``FusedSGD`` (torch's fused SGD,
skipping on ``found_inf``) against ``FlatSGD`` (flat state, gradients gathered by one ``cat``).

``python benchmarks/sgd_update.py [--width 16] [--rounds 60]`` times, interleaved round by round, the
finite check plus the update of each (median *process CPU time*, 1 thread, so that other processes on
a shared machine do not count) and counts their kernel launches (``apart_fast.bench.launches``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apart_fast.bench.launches import count_launches
from apart_fast.models import build_model
from apart_fast.step.guard import finite_flag, gather_grads
from apart_fast.step.optim import FlatSGD, FusedSGD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = [build_model("preact18", num_classes=10, in_channels=3, width=args.width) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    grads = [torch.randn_like(p) for p in models[0].parameters()]
    opts = {"fused": FusedSGD(models[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            "flat": FlatSGD(models[1].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)}
    loss = torch.tensor(1.0)

    def prepare(opt: torch.optim.Optimizer) -> None:
        for p, g in zip(opt.param_groups[0]["params"], grads):
            p.grad = g.clone() if opt is opts["flat"] else g  # flat: fresh .grad tensors, as after a backward

    def update(opt: torch.optim.Optimizer) -> None:
        opt.step_if(finite_flag(loss, gather_grads(opt)))

    def timed(opt: torch.optim.Optimizer) -> float:
        prepare(opt)
        t0 = time.process_time()
        update(opt)
        return time.process_time() - t0

    launches = {}
    for k, o in opts.items():
        timed(o)
        prepare(o)
        launches[k] = count_launches(lambda o=o: update(o), torch.device("cpu"))["total"]
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for k, o in opts.items():
            times[k].append(timed(o))
    n = sum(p.numel() for p in models[0].parameters())
    print(f"PreAct-18 width {args.width} ({n / 1e6:.2f}M parameters), CPU, 1 thread, torch {torch.__version__}")
    for k in opts:
        print(f"  {k:5s}: {statistics.median(times[k]) * 1e3:7.2f} ms (median process CPU time, {args.rounds} interleaved), "
              f"{launches[k]} launches (check + update)")


if __name__ == "__main__":
    main()
