"""PGD-20 evaluation throughput (images/s) on the CPU or a GPU: batch sizes, fused vs reference pgd_step, graphs.

    python benchmarks/eval_speed.py --model preact18 --width 16 --size 32 --n 256 --batches 64,128,256
    python benchmarks/eval_speed.py --device cuda --model preact18 --width 64 --n 4096 --batches 256,1024

Random weights and images (throughput does not depend on them). Each setting keeps one ``PGDLoop`` across two
``evaluate`` calls: the first, on one batch, runs the eager warm-ups and (CUDA graphs) the capture; the second, over
all images, is timed, so the graphs column counts replays only. ``capture_s`` is what the first call took beyond its
share at the timed rate. One JSON line per batch size, with the op backend that ``auto`` picked; report ratios from one
run, the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from apart_fast.attacks import evaluate
from apart_fast.attacks.pgd import PGDLoop, ce_loss
from apart_fast.models import build_model
from apart_fast.ops import dispatch

EPS, STEP, STEPS = 8 / 255, 2 / 255, 20


def _timed(fn: object, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, backend: str = "auto",
            cuda_graphs: bool = True) -> tuple[float, float]:
    """``(images/s over x at batch, seconds of warm-up and capture)``: see the module docstring."""
    cuda = x.is_cuda
    loop = PGDLoop(model, ce_loss, EPS, STEP, STEPS, backend, graphs=cuda and cuda_graphs)
    kw = dict(batch_size=batch, eps=EPS, step=STEP, steps=STEPS, backend=backend, cuda_graphs=cuda_graphs, loop=loop)
    first = _timed(lambda: evaluate(model, x[:batch], y[:batch], **kw), cuda)
    ips = x.shape[0] / _timed(lambda: evaluate(model, x, y, **kw), cuda)
    return ips, max(first - min(batch, x.shape[0]) / ips, 0.0)


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
        r: dict[str, object] = {"batch": b, "backend": dispatch.resolve("auto", x.device)}
        r["fused"], r["capture_s"] = measure(model, x, y, b)
        r["reference"] = measure(model, x, y, b, backend="torch")[0]
        if a.device.startswith("cuda"):
            r["eager"] = measure(model, x, y, b, cuda_graphs=False)[0]
        rows.append(r)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
