"""Issue 21's measurements in one command: APART on models it did not write, against FGSM-RS and clean training.

    python benchmarks/dropin.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --out runs/dropin

Accuracy: torchvision's ResNet-18 with the CIFAR stem (``--model torchvision:resnet18 --stem cifar``, sites
hooked on by APART) and the project's small ViT (``--model vit``: patch 4, 6 blocks, width 128, sites on
each branch's normalised input), each trained with clean, FGSM-RS and APART on a seeded CIFAR-10 training
subset at eps 8/255 (no validation slice; 5 epochs for the ResNet-18, 15 for the ViT), for each seed;
scored by PGD-20 with the CE and the CW loss (step 2/255, eval mode) on a seeded test subset (256 points for
the ResNet-18, 500 for the ViT) and clean on the whole test split. Cost: ``bench cost``'s seconds per step of FGSM-RS and
APART (round-robin, one torch thread) for the hooked ResNet-18 and for the project's PreAct-18 width 16
(marked sites), on the same data; APART / FGSM-RS is each model's ratio.

Writes OUT/accuracy.jsonl (one line per run, appended as runs finish, so an interrupted command resumes
where it stopped: a run's finished training is kept, an unfinished one resumes from its checkpoint),
OUT/cost-<model>/ (bench cost's files) and prints the README's tables (markdown). Commands with disjoint
--models or --seeds may run side by side on one OUT (each core trains one run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean, stdev

import torch

from apart_fast.bench.cost import CostOptions, run_cost
from apart_fast.config import Config
from apart_fast.engine.loop import train_once
from apart_fast.experiments import evaluate_checkpoint

# the ViT diverges (non-finite loss in epoch 4 of clean training) at the SGD peak lr 0.2 the ResNets use
MODELS = {"resnet18": dict(model="torchvision:resnet18", stem="cifar"), "vit": dict(model="vit", lr=0.05)}
# per model: a full-width ResNet-18 step costs ~14x a PreAct-18 width 16 step on a CPU, so it gets fewer epochs and
# test points (PGD-20 CE and CW on 256 points is 2 x 21 x 2 forward-backward batches); the ViT learns slowly
EPOCHS = {"resnet18": 5, "vit": 15}
N_TEST = {"resnet18": 256, "vit": 500}
COST_MODELS = {"resnet18": dict(model="torchvision:resnet18", stem="cifar", width=None),
               "preact18": dict(model="preact18", width=16)}


def run_one(args: argparse.Namespace, model: str, method: str, seed: int) -> dict:
    """Train one (model, method, seed), evaluate its model.pt, return the JSON row."""
    folder = Path(args.out) / f"{model}_{method}_s{seed}"
    epochs = args.epochs or EPOCHS[model]
    cfg = Config(method=method, dataset="cifar10", data_dir=args.data_dir, epochs=epochs, batch_size=args.batch_size,
                 train_subset=args.subset, eval_n=0, final_eval_steps=0, device="cpu", seed=seed, out=str(folder),
                 **MODELS[model])
    res = train_once(cfg, progress=False)  # kept or resumed from an earlier, interrupted invocation
    ev = evaluate_checkpoint(str(folder / "model.pt"), steps=20, loss="both", n=args.n_test or N_TEST[model], device="cpu", progress=False)
    last = res["history"][-1]
    layers = [v / cfg.eps for k, v in last.items() if k.startswith("a_layer")]
    return {"model": model, "method": method, "seed": seed, "subset": args.subset, "epochs": epochs,
            "clean_test_split": res["test_clean_acc"],
            "n_test_split": res["test_n"], "clean": ev["clean_acc"], "pgd20_ce": ev["pgd_ce_acc"],
            "pgd20_cw": ev["pgd_cw_acc"], "n_test": ev["n"], "train_s": round(res["train_seconds"], 1),
            "sites": (res.get("apart") or {}).get("sites"), "a_layer_over_eps": [round(v, 4) for v in layers],
            "a_in_over_eps": round(last["a_in"] / cfg.eps, 4) if "a_in" in last else None}


def _mean_se(values: list[float]) -> str:
    """Mean ± the standard error of the mean over seeds."""
    return f"{mean(values):.3f} ± {stdev(values) / math.sqrt(len(values)):.3f}"


def accuracy_table(rows: list[dict]) -> str:
    """Per model and method: each seed's clean (whole test split) and PGD-20 CE / CW accuracy (test subset), their mean."""
    lines = ["| model (training images x epochs) | method | seed | clean (test split) | clean (subset) | PGD-20 CE | "
             "PGD-20 CW | APART a_in / eps | APART a_layer / eps (min..max) |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, method) in sorted({(r["model"], r["method"]) for r in rows}):
        group = sorted((r for r in rows if (r["model"], r["method"]) == (model, method)), key=lambda r: r["seed"])
        setting = " / ".join(sorted({f"{r['subset']} x {r['epochs']}" for r in group}))
        label = f"{model} ({setting})"
        for r in group:
            se = math.sqrt(r["pgd20_ce"] * (1 - r["pgd20_ce"]) / r["n_test"])
            al = r["a_layer_over_eps"]
            steps = f"{min(al):.3f}..{max(al):.3f} ({len(al)} sites)" if al else "—"
            a_in = f"{r['a_in_over_eps']:.3f}" if r["a_in_over_eps"] is not None else "—"
            lines.append(f"| {label} | {method} | {r['seed']} | {r['clean_test_split']:.3f} | {r['clean']:.3f} | "
                         f"{r['pgd20_ce']:.3f} ± {se:.3f} | {r['pgd20_cw']:.3f} | {a_in} | {steps} |")
        if len(group) > 1:
            cells = " | ".join(_mean_se([r[k] for r in group]) for k in ("clean_test_split", "clean", "pgd20_ce", "pgd20_cw"))
            lines.append(f"| {label} | {method} | mean ± s.e. ({len(group)} seeds) | {cells} | | |")
    return "\n".join(lines)


def cost(args: argparse.Namespace) -> str:
    """bench cost of FGSM-RS and APART on each cost model; the APART / FGSM-RS ratios as a table."""
    lines = ["| model | FGSM-RS s/step | APART s/step | APART / FGSM-RS |", "|---|---|---|---|"]
    for name, kw in COST_MODELS.items():
        opts = CostOptions(methods=["fgsm_rs", "apart"], dataset="cifar10", data_dir=args.data_dir, batch_size=args.batch_size,
                           device="cpu", warmup=2, steps=args.cost_steps, rounds=args.cost_rounds,
                           out=str(Path(args.out) / f"cost-{name}"), progress=False, **kw)
        rows = {r["method"]: r for r in run_cost(opts)["rows"]}
        fg, ap = rows["fgsm_rs"]["s_per_step"], rows["apart"]["s_per_step"]
        lines.append(f"| {name} ({kw['model']}) | {fg:.3f} | {ap:.3f} | {ap / fg:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--out", default="runs/dropin")
    p.add_argument("--models", default="resnet18,vit", help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--methods", default="clean,fgsm_rs,apart")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--subset", type=int, default=2560,
                   help="seeded CIFAR-10 training subset (the one the default rule was chosen on)")
    p.add_argument("--epochs", type=int, default=None, help=f"default: per model, {EPOCHS}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-test", type=int, default=None,
                   help=f"seeded test subset scored by PGD-20 CE and CW; default: per model, {N_TEST}")
    p.add_argument("--cost-steps", type=int, default=3, help="timed steps per method and round")
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--no-cost", action="store_true", help="accuracy only")
    p.add_argument("--cost-only", action="store_true", help="the cost table only (and the accuracy rows recorded so far)")
    args = p.parse_args()
    if args.no_cost and args.cost_only:
        p.error("--no-cost and --cost-only exclude each other; pass one")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models {args.models!r}: unknown {', '.join(map(repr, unknown))}; choose from {','.join(MODELS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "accuracy.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["model"], r["method"], r["seed"]) for r in rows}
    for model in [] if args.cost_only else args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in args.methods.split(","):
                if (model, method, seed) in done:
                    continue
                row = run_one(args, model, method, seed)
                rows.append(row)
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr, flush=True)
    if rows:
        print(accuracy_table(rows))
    if not args.no_cost:
        print()
        print(cost(args))


if __name__ == "__main__":
    main()
