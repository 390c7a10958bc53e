"""The measurement behind APART's default schedule: candidate rules for the generator's start and lr, each
trained on the same data and scored by PGD-20 on the test split (README, "APART's defaults").

    python benchmarks/apart_defaults.py digits script lr_only eps4 eps2 ... --out runs/defaults_digits.jsonl
    python benchmarks/apart_defaults.py cifar eps2 script --data-dir ../shared/data/cifar10-jpeg.tar.gz --out ...

One JSON line per run: the rule, the generator's resolved settings, clean and PGD-20 accuracy with their
standard errors, the step sizes at the end. Settings: digits = the demo's (SmallCNN, eps 0.1, 15 epochs);
cifar = CIFAR-10 (JPEG), seeded 2,560-image training subset, PreAct-18 width 16, 10 epochs, eps 8/255,
scored on a seeded 1,000-image test subset. No validation slice (``eval_n`` 0): every run trains on the same images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from apart_fast.config import ApartConfig, Config
from apart_fast.engine.loop import train
from apart_fast.experiments import demo_config, evaluate_checkpoint


def candidates(eps: float, steps: int) -> dict[str, tuple[str, ApartConfig]]:
    """Rule name -> (method, generator) for a run of ``steps`` steps at budget ``eps``."""
    auto = ApartConfig().resolve(eps, steps)  # the default: the script's generator in units of eps
    full = ApartConfig(schedule="full").resolve(eps, steps)
    return {
        "clean": ("clean", ApartConfig()),
        "fgsm_rs": ("fgsm_rs", ApartConfig()),
        "nfgsm": ("nfgsm", ApartConfig()),
        "script": ("apart", ApartConfig(schedule="script")),  # the script's constants: 1e-4 start, lr 5e-8, lambda 400
        "full": ("apart", ApartConfig(schedule="full")),  # the previous default: eps/2, eps from the start, lambda 400
        "full_frozen": ("apart", ApartConfig(schedule="full", lr=0.0)),  # ... with the generator frozen: the stored sign
        "auto": ("apart", ApartConfig()),  # the default
        "auto_frozen": ("apart", ApartConfig(lr=0.0)),  # the default's start, frozen (nearly clean training)
        **{f"auto_x{k}": ("apart", ApartConfig(lr=k * auto.lr)) for k in (2, 4, 8, 16)},  # faster clocks
        **{f"auto_x{k}_s10": ("apart", ApartConfig(lr=k * auto.lr, a_init=eps / 10, a_in=eps / 10)) for k in (1, 4)},
        "auto_x4_wd4": ("apart", ApartConfig(lr=4 * auto.lr, weight_decay=4 * auto.weight_decay)),
        "auto_wd3": ("apart", ApartConfig(weight_decay=3 * auto.weight_decay)),  # the authors' effective penalty (~1200)
        "full_lam_auto": ("apart", ApartConfig(schedule="full", lr=auto.lr, weight_decay=auto.weight_decay)),
        "full_lr_auto": ("apart", ApartConfig(schedule="full", lr=full.lr * 4)),
    }


def config(setting: str, rule: str, data_dir: str | None, out: str, eps: float | None = None, seed: int = 0) -> Config:
    """The run's Config for one rule in one setting."""
    if setting == "digits":
        cfg = demo_config("clean", 15, "cpu", seed)
    else:
        cfg = Config(dataset="cifar10", data_dir=data_dir, model="preact18", width=16, epochs=10, train_subset=2560,
                     final_eval_steps=0, device="cpu", seed=seed)
    cfg.eval_n, cfg.out = 0, out
    if eps is not None:
        cfg.eps = eps
    n_train = 1438 if setting == "digits" else 2560  # no validation slice: the whole (sub)split is trained on
    cfg.method, cfg.apart = candidates(cfg.eps, cfg.epochs * (n_train // cfg.batch_size))[rule]
    return cfg.resolved()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("setting", choices=("digits", "cifar"))
    p.add_argument("rules", nargs="+")
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--out", required=True, help="JSON lines file (appended)")
    p.add_argument("--runs", default="runs/apart_defaults", help="folder for the runs' checkpoints")
    p.add_argument("--eps", type=float, help="training and evaluation eps (default: the setting's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=1000, help="cifar: seeded test subset scored")
    args = p.parse_args()
    torch.set_num_threads(1)
    for rule in args.rules:
        tag = f"_eps{round(args.eps * 255)}" if args.eps else ""
        run_dir = f"{args.runs}/{args.setting}{tag}_{rule}_s{args.seed}"
        cfg = config(args.setting, rule, args.data_dir, run_dir, args.eps, args.seed)
        res = train(cfg, overwrite=True, progress=False)
        n = None if args.setting == "digits" else args.n_test
        ev = evaluate_checkpoint(f"{run_dir}/model.pt", dataset=cfg.dataset, data_dir=cfg.data_dir, eps=cfg.eval_eps,
                                 step=cfg.eval_step, steps=20, loss="both", n=n, device="cpu", progress=False)
        worst = min(ev["pgd_ce_acc"], ev["pgd_cw_acc"])
        row = {"setting": args.setting, "eps": cfg.eps, "seed": args.seed, "rule": rule, "method": cfg.method,
               "generator": res.get("apart"), "clean": ev["clean_acc"], "pgd20": ev["pgd_ce_acc"], "cw20": ev["pgd_cw_acc"],
               "worst": worst, "se": math.sqrt(worst * (1 - worst) / ev["n"]), "n_test": ev["n"],
               "train_s": round(res["train_seconds"], 1),
               "step_sizes": [{k: round(v / cfg.eps, 4) for k, v in h.items() if k.startswith("a_")} for h in res["history"]]}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
