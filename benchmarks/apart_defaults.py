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

from apart_fast.config import SCRIPT_LR, SCRIPT_STEPS, ApartConfig, Config
from apart_fast.engine.loop import train
from apart_fast.experiments import demo_config, evaluate_checkpoint


def candidates(eps: float, steps: int) -> dict[str, tuple[str, ApartConfig]]:
    """Rule name -> (method, generator) for a run of ``steps`` steps. ``auto`` lr: lr x steps = the script's."""
    half, auto_lr = eps / 2, SCRIPT_LR * SCRIPT_STEPS / steps
    return {
        "clean": ("clean", ApartConfig()),
        "fgsm_rs": ("fgsm_rs", ApartConfig()),
        "script": ("apart", ApartConfig(schedule="script")),  # 1e-4 start, lr 5e-8
        "lr_only": ("apart", ApartConfig(a_init=1e-4, a_in=1e-4)),  # lr scaled, the script's start
        "start_only": ("apart", ApartConfig(schedule="script", a_init=half, a_in=eps)),  # the default start, the script's lr
        "eps4": ("apart", ApartConfig(a_init=eps / 4, a_in=eps / 4)),
        "eps2": ("apart", ApartConfig(a_init=half, a_in=half)),
        "eps2_in1": ("apart", ApartConfig()),  # the default: schedule auto (a_init eps/2, a_in eps, lr scaled)
        "eps1": ("apart", ApartConfig(a_init=eps, a_in=eps)),
        "eps2_in1_lr10": ("apart", ApartConfig(lr=10 * auto_lr)),
    }


def config(setting: str, rule: str, data_dir: str | None, out: str) -> Config:
    """The run's Config for one rule in one setting."""
    if setting == "digits":
        cfg = demo_config("clean", 15, "cpu", 0)
    else:
        cfg = Config(dataset="cifar10", data_dir=data_dir, model="preact18", width=16, epochs=10, train_subset=2560,
                     final_eval_steps=0, device="cpu")
    cfg.eval_n, cfg.out = 0, out
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
    args = p.parse_args()
    torch.set_num_threads(1)
    for rule in args.rules:
        run_dir = f"{args.runs}/{args.setting}_{rule}"
        cfg = config(args.setting, rule, args.data_dir, run_dir)
        res = train(cfg, overwrite=True, progress=False)
        n = None if args.setting == "digits" else 1000
        ev = evaluate_checkpoint(f"{run_dir}/model.pt", dataset=cfg.dataset, data_dir=cfg.data_dir, eps=cfg.eval_eps,
                                 step=cfg.eval_step, steps=20, loss="ce", n=n, device="cpu")
        last = res["history"][-1]
        row = {"setting": args.setting, "rule": rule, "method": cfg.method, "generator": res.get("apart"),
               "clean": ev["clean_acc"], "pgd20": ev["pgd_ce_acc"], "se": math.sqrt(ev["pgd_ce_acc"] * (1 - ev["pgd_ce_acc"]) / ev["n"]),
               "n_test": ev["n"], "train_s": round(res["train_seconds"], 1),
               "end_step_sizes": {k: round(v, 5) for k, v in last.items() if k.startswith("a_")}}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
