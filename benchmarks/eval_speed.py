"""PGD-20 evaluation throughput (images/s) on the CPU or a GPU: batch sizes, fused vs reference pgd_step, graphs.

    python benchmarks/eval_speed.py --model preact18 --width 16 --size 32 --n 256 --batches 64,128,256
    python benchmarks/eval_speed.py --device cuda --model preact18 --width 64 --n 4096 --batches 256,1024

Random weights and images (throughput does not depend on them). Each setting runs once after one
warm-up batch; report ratios from one run, the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from apart_fast.attacks import evaluate
from apart_fast.models import build_model


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, **kw: object) -> float:
    """PGD-20 images per second over ``x`` at ``batch``, after one warm-up batch."""
    evaluate(model, x[:batch], y[:batch], batch_size=batch, steps=20, **kw)
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    evaluate(model, x, y, batch_size=batch, steps=20, **kw)
    if x.is_cuda:
        torch.cuda.synchronize()
    return x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preact18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(a.model, num_classes=10, in_channels=3, width=a.width).to(a.device).eval()
    x = torch.rand(a.n, 3, a.size, a.size, device=a.device)
    y = torch.randint(0, 10, (a.n,), device=a.device)
    rows = []
    for b in (int(s) for s in a.batches.split(",")):
        r = {"batch": b, "fused": measure(model, x, y, b)}
        r["reference"] = measure(model, x, y, b, backend="torch")
        if a.device.startswith("cuda"):
            r["eager"] = measure(model, x, y, b, cuda_graphs=False)
        rows.append(r)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
