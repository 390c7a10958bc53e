"""``apart-fast bench kernels|cost``: argument parsing only; the work is in ``kernels.py`` and ``cost.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apart_fast.config import METHODS, MODELS, STEMS, TORCHVISION

COST_EXAMPLE = ("apart-fast bench cost --dataset cifar10 --data-dir cifar10-jpeg.tar.gz --model preact18 --width 16 "
                "--batch-size 128")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommands and their flags."""
    sub = p.add_subparsers(dest="what", required=True, metavar="{kernels,cost}")

    k = sub.add_parser("kernels", help="op benchmarks (pytest-benchmark): time, bytes, GB/s, fraction of copy bandwidth")
    k.add_argument("--path", default=None, help="benchmark folder or file (default: the repository's benchmarks/)")
    k.add_argument("--filter", default=None, help="pytest -k expression selecting benchmarks")
    k.add_argument("--out", default=None, help="output folder (default bench-kernels-<timestamp>)")
    k.add_argument("--compare", metavar="OLD.json", default=None,
                   help="an earlier kernels.json (or pytest-benchmark JSON); flags regressions beyond the spread")
    k.add_argument("--fail-on-regression", action="store_true", help="exit 3 when --compare finds a regression")
    k.add_argument("--timeout", type=float, default=None, help="seconds allowed for the pytest run")
    k.add_argument("--device", default=None, help="device of the copy-bandwidth measurement (default: the benchmarks')")
    k.add_argument("--threads", type=int, default=None, help="torch CPU threads of the benchmark process")
    k.add_argument("--pytest-arg", dest="pytest_args", action="append", default=[],
                   help="extra argument for pytest, repeatable (e.g. --pytest-arg=--benchmark-min-rounds=20)")

    c = sub.add_parser("cost", help="seconds per step and epoch of each method against PGD-10 and clean",
                       description=f"example: {COST_EXAMPLE}")
    c.add_argument("--methods", default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all but fgsm)")
    c.add_argument("--model", default="preact18", help=f"{', '.join(MODELS)} or {TORCHVISION}NAME (default preact18)")
    c.add_argument("--width", type=int, default=None,
                   help="first stage's channels (default 16; preact18: 64 is the paper's; none for torchvision: models)")
    c.add_argument("--stem", default="native", choices=STEMS, help="torchvision: models: native or cifar (train --stem)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--dataset", default="synthetic", choices=("synthetic", "digits", "cifar10", "cifar100", "imagefolder"))
    c.add_argument("--data-dir", default=None, help="CIFAR folder or .tar.gz (e.g. cifar10-jpeg.tar.gz)")
    c.add_argument("--image-size", type=int, default=None, help="synthetic only: resize the 16x16 images (32: CIFAR's size)")
    c.add_argument("--synthetic-n", type=int, default=1024, help="synthetic only: number of training examples")
    c.add_argument("--epoch-size", type=int, default=None,
                   help="examples per epoch for s/epoch (default: the training set; 50000 projects CIFAR-10)")
    c.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    c.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="fp32, or autocast in bf16 / fp16 (loss-scaled) around the forward passes")
    c.add_argument("--backend", default="auto", help="perturbation-op backend: auto, torch, cpp, triton, cuda")
    c.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    c.add_argument("--steps", type=int, default=10, help="timed steps per method and round")
    c.add_argument("--rounds", type=int, default=1, help="time the methods round-robin this many times (fairer under load)")
    c.add_argument("--pgd-steps", type=int, default=10)
    c.add_argument("--free-replays", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    c.add_argument("--train-epochs", type=int, default=0, help="also train each method for E epochs")
    c.add_argument("--eval", action="store_true", help="with --train-epochs: clean and PGD-20 test accuracy")
    c.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test examples only")
    c.add_argument("--out", default=None, help="output folder (default bench-cost-<timestamp>)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each step in a CUDA graph (default: the engine's, on for CUDA where possible)")
    c.add_argument("--compile", action="store_true", help="torch.compile the model")
    c.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    c.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="every method also updates a weight average (train --ema) after each step: its cost is in the times")


def run(args: argparse.Namespace) -> int:
    """Dispatch to ``bench kernels`` or ``bench cost``; print the table and where the files went."""
    if args.what == "kernels":
        from apart_fast.bench.kernels import KernelOptions, compare_text, run_kernels, table

        opts = KernelOptions(filter=args.filter, out=args.out, compare=args.compare,
                             fail_on_regression=args.fail_on_regression, timeout=args.timeout,
                             pytest_args=args.pytest_args, device=args.device, threads=args.threads)
        if args.path:
            opts.path = args.path
        result, status = run_kernels(opts)
        if result["rows"]:
            cb = result.get("copy_bandwidth") or {}
            print(f"{result['env']['device_name']}; copy bandwidth {cb.get('gbps', 0):.1f} GB/s ({cb.get('source')})")
            print(table(result["rows"]))
        if "compare" in result:
            print(compare_text(result["compare"]))
        print(f"wrote {result.get('out', opts.out)}/kernels.json", file=sys.stderr)
        return status

    import torch

    from apart_fast.bench.cost import DEFAULT_METHODS, CostOptions, run_cost

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = CostOptions(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(DEFAULT_METHODS),
        model=args.model, width=args.width if args.width is not None or args.model.startswith(TORCHVISION) else 16,
        stem=args.stem,
        batch_size=args.batch_size, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
        synthetic_n=args.synthetic_n, epoch_size=args.epoch_size, device=args.device, dtype=args.dtype,
        backend=args.backend, warmup=args.warmup, steps=args.steps, rounds=args.rounds, pgd_steps=args.pgd_steps,
        free_replays=args.free_replays, seed=args.seed, train_epochs=args.train_epochs, eval=args.eval,
        eval_n=args.eval_n, out=args.out, progress=not args.no_progress, cuda_graphs=args.cuda_graphs,
        compile=args.compile, compile_backend=args.compile_backend, ema=args.ema,
    )
    result = run_cost(opts)
    print((Path(result["out"]) / "cost.md").read_text())
    print(f"wrote {result['out']}/cost.md, cost.json, cost.png", file=sys.stderr)
    return 0
