"""``apart-fast ablation``: what each part of APART buys, measured against its own ablations, in one command.

Rows (``ROWS``): APART at its defaults; the generator frozen at its start (``--apart-lr 0``: the block steps
stay 0); frozen at the values the default ends with (each block's own, layer perturbations on, no learning);
without layer perturbations; without the per-example store (a fresh U(-1, 1) start each step); the script's
constants; the previous default (``full``: the stored sign at full strength from the first step); FGSM-RS;
N-FGSM. Each row runs at every ``--eps``; the rows that decide the targets (``MAIN_ROWS``) with every seed of
``--seeds``, the others with ``--other-seeds``.

A unit (eps, row, seed) is one engine ``train`` run in ``OUT/eps<k>/<row>/s<seed>/`` (its metrics.jsonl holds
the step sizes and the perturbation-strength probe per epoch), scored in eval mode on a seeded ``--test-n``
test subset (the same points for every unit) by PGD-20 with the CE and the CW loss, and for the first
``--aa-seeds`` seeds by AutoAttack on the first ``--aa-n`` of those points; ``unit.json`` records it.
``--resume`` keeps finished units and continues an interrupted one from its checkpoint, so the study can be
split over processes (``--rows``, ``--eps``, ``--seeds``) into one OUT; every invocation ends by writing the
table and figures of all finished units (``ablation_report``), and ``--report-only`` does only that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apart_fast.bench.env import device_name
from apart_fast.config import ApartConfig, Config, ConfigError, check_budget, fraction

CIFAR_JPEG = "../shared/data/cifar10-jpeg.tar.gz"
# row -> (method, label, generator overrides); "frozen_end" takes the default's end values (``frozen_end_overrides``)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "default": ("apart", "APART (default)", {}),
    "frozen_start": ("apart", "frozen at its start (lr 0)", {"lr": 0.0}),
    "frozen_end": ("apart", "frozen at the default's end values", {"lr": 0.0}),
    "no_layer": ("apart", "without layer perturbations", {"layer_perturb": False}),
    "no_store": ("apart", "without the per-example store", {"store": False}),
    "script": ("apart", "the script's constants", {"schedule": "script"}),
    "full": ("apart", "previous default (full strength at once)", {"schedule": "full"}),
    "fgsm_rs": ("fgsm_rs", "FGSM-RS", {}),
    "nfgsm": ("nfgsm", "N-FGSM", {}),
}
MAIN_ROWS = ("default", "frozen_start", "fgsm_rs", "nfgsm")  # the rows the targets compare: every seed


@dataclass(frozen=True)
class Study:
    """The ablation's setting: one CIFAR-10 (JPEG) subset, one model, the same for every row."""

    data_dir: str = CIFAR_JPEG
    model: str = "preact18"
    width: int = 16
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.2
    train_subset: int = 4000
    test_n: int = 1000
    aa_n: int = 100
    aa_seeds: int = 1
    device: str = "cpu"

    def config(self, row: str, eps: float, seed: int, out: Path, generator: dict[str, Any] | None = None) -> Config:
        """The engine Config of one unit (no validation slice: every row trains on the same images of its seed)."""
        method, _, over = ROWS[row]
        apart = ApartConfig(**(generator if generator is not None else over))
        return Config(method=method, dataset="cifar10", data_dir=self.data_dir, model=self.model, width=self.width,
                      epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, train_subset=self.train_subset,
                      eps=eps, eval_n=0, final_eval_steps=0, device=self.device, seed=seed, out=str(out),
                      apart=apart).validate().resolved()


def unit_dir(out: Path, eps: float, row: str, seed: int) -> Path:
    return out / f"eps{round(eps * 255)}" / row / f"s{seed}"


def frozen_end_overrides(default_unit: dict[str, Any]) -> dict[str, Any]:
    """The generator of ``frozen_end``: the default run's last-epoch step sizes, frozen (lr 0)."""
    last = default_unit["history"][-1]
    layers = sorted((k for k in last if k.startswith("a_layer")), key=lambda k: int(k[7:]))
    return {"lr": 0.0, "a_init": max(last["a_init"], 0.0), "a_in": max(last["a_in"], 0.0),
            "a_layers": ",".join(repr(float(last[k])) for k in layers)}


def evaluate_unit(path: Path, study: Study, eps: float, seed: int, progress: bool) -> dict[str, Any]:
    """Clean, PGD-20 CE and CW on the study's test subset; AutoAttack on its first ``aa_n`` points for early seeds."""
    from apart_fast.experiments import evaluate_checkpoint

    ev = evaluate_checkpoint(str(path / "model.pt"), attack="pgd", loss="both", n=study.test_n, eps=eps, step=eps / 4,
                             steps=20, device=study.device, seed=0, progress=progress)
    res = {"clean": ev["clean_acc"], "pgd_ce": ev["pgd_ce_acc"], "pgd_cw": ev["pgd_cw_acc"], "n": ev["n"],
           "aa": None, "aa_n": None}
    if seed < study.aa_seeds and study.aa_n > 0:
        res.update(autoattack_unit(path, study, eps))
    return res


def autoattack_unit(path: Path, study: Study, eps: float) -> dict[str, Any]:
    """AutoAttack (standard version) on the first ``aa_n`` points of the study's test subset, and PGD-20's CE and CW
    on the same points (``pgd_on_aa``, the lower), so that what AutoAttack adds is read on one set of points."""
    from apart_fast.experiments import evaluate_checkpoint

    aa = evaluate_checkpoint(str(path / "model.pt"), attack="all", n=study.aa_n, eps=eps, step=eps / 4, steps=20,
                             device=study.device, seed=0, progress=False)
    return {"aa": aa["autoattack_acc"], "aa_n": aa["n"], "aa_settings": aa["settings"].get("autoattack"),
            "pgd_on_aa": min(aa["pgd_ce_acc"], aa["pgd_cw_acc"])}


def run_unit(study: Study, out: Path, row: str, eps: float, seed: int, *, resume: bool, progress: bool,
             generator: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and score one unit (or, with ``resume``, reuse what is finished); returns and writes its unit.json."""
    from apart_fast.engine.loop import train, train_once

    path = unit_dir(out, eps, row, seed)
    done = path / "unit.json"
    if resume and done.exists():
        unit = json.loads(done.read_text())
        if unit.get("aa") is None and seed < study.aa_seeds and study.aa_n > 0:  # AutoAttack added by a later --aa-n
            unit.update(autoattack_unit(path, study, eps))
            done.write_text(json.dumps(unit, indent=1))
        return unit
    cfg = study.config(row, eps, seed, path, generator)
    res = train_once(cfg, progress=progress) if resume else train(cfg, overwrite=True, progress=progress)
    unit = {"row": row, "method": cfg.method, "eps": eps, "seed": seed, "generator": res.get("apart"),
            "train_seconds": res["train_seconds"], "history": res["history"],
            **evaluate_unit(path, study, eps, seed, progress)}
    done.write_text(json.dumps(unit, indent=1))
    return unit


# Rows whose step computes something other than the default's (frozen, script and full run the default's operations)
COST_VARIANTS = {"no_layer": ("apart", {"layer_perturb": False}), "no_store": ("apart", {"store": False})}


def measure_cost(study: Study, out: Path, rounds: int, progress: bool) -> None:
    """Seconds per training step of PGD-10, FGSM-RS, N-FGSM, APART and its two cheaper ablations, timed round-robin in
    one process (``bench.cost.measure``) on the study's data and model; writes ``cost.json``."""
    from apart_fast.bench.cost import CostOptions, measure
    from apart_fast.data import load_dataset

    opts = CostOptions(methods=["pgd", "fgsm_rs", "nfgsm", "apart"], model=study.model, width=study.width,
                       batch_size=study.batch_size, dataset="cifar10", data_dir=study.data_dir, device=study.device,
                       warmup=2, steps=2, rounds=rounds, progress=progress)
    rows, _ = measure(opts, load_dataset("cifar10", study.data_dir), COST_VARIANTS)
    cost = {r["method"]: {"s_per_step": r["s_per_step"], "vs_pgd10": r["step_vs_pgd"], "round_medians": r["round_medians"]}
            for r in rows}
    (out / "cost.json").write_text(json.dumps({"rounds": rounds, "steps_per_round": opts.steps, "rows": cost}, indent=1))


def load_units(out: Path) -> list[dict[str, Any]]:
    """Every finished unit under ``out``."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("eps*/*/s*/unit.json"))]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ablation subcommand's options."""
    d = Study()
    p.add_argument("--out", required=True, help="study folder (one sub-folder per eps, row and seed)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)} (default all)")
    p.add_argument("--eps", default="8/255,16/255", help="comma-separated budgets (default 8/255,16/255)")
    p.add_argument("--seeds", default="0,1,2", help=f"seeds of the main rows {','.join(MAIN_ROWS)} (default 0,1,2)")
    p.add_argument("--other-seeds", default="0", help="seeds of the other rows (default 0)")
    p.add_argument("--data-dir", default=d.data_dir, help=f"CIFAR-10 folder or archive (default {CIFAR_JPEG})")
    p.add_argument("--train-subset", type=int, default=d.train_subset, help="seeded training subset (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="PreAct-18 width (default %(default)s)")
    p.add_argument("--test-n", type=int, default=d.test_n, help="seeded test points for PGD-20 (default %(default)s)")
    p.add_argument("--aa-n", type=int, default=d.aa_n, help="AutoAttack points, the first of the test subset (0: none)")
    p.add_argument("--aa-seeds", type=int, default=d.aa_seeds, help="AutoAttack for seeds below this (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--cost-rounds", type=int, default=4,
                   help="rounds of the interleaved step-cost measurement against PGD-10 (cost.json; 0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: run two studies side by side on 2 cores)")
    p.add_argument("--resume", action="store_true", help="keep the finished units in --out")
    p.add_argument("--report-only", action="store_true", help="only write the table and figures of the finished units")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    if any(v < 0 for v in vals):
        raise ConfigError(f"{flag} {text!r} holds a negative seed; pass seeds >= 0")
    return vals


def plan(args: argparse.Namespace) -> tuple[Study, list[float], list[tuple[str, float, int]]]:
    """The study's setting and its units in the order they run (every check before anything is written)."""
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ConfigError(f"--rows: unknown {', '.join(bad)}; choose from {','.join(ROWS)}")
    eps_list = []
    for text in args.eps.split(","):
        e = fraction(text, "--eps")
        check_budget("--eps", e)
        eps_list.append(e)
    seeds, others = _ints(args.seeds, "--seeds"), _ints(args.other_seeds, "--other-seeds")
    for flag, v, lo in (("--train-subset", args.train_subset, 256), ("--epochs", args.epochs, 1), ("--width", args.width, 1),
                        ("--test-n", args.test_n, 1), ("--aa-n", args.aa_n, 0), ("--aa-seeds", args.aa_seeds, 0)):
        if v < lo:
            raise ConfigError(f"{flag} {v} must be at least {lo}")
    study = Study(data_dir=args.data_dir, width=args.width, epochs=args.epochs, train_subset=args.train_subset,
                  test_n=args.test_n, aa_n=min(args.aa_n, args.test_n), aa_seeds=args.aa_seeds, device=args.device)
    # seed by seed, so that every row has one seed before any has three; frozen_end after its default
    order = [(row, e, s) for s in sorted(set(seeds) | set(others)) for e in eps_list for row in rows
             if s in (seeds if row in MAIN_ROWS else others)]
    order.sort(key=lambda u: (u[2], u[0] == "frozen_end"))
    return study, eps_list, order


def run(args: argparse.Namespace) -> int:
    """Run every planned unit not yet finished, then write the report of all finished units."""
    from apart_fast.engine.device import auto_device

    args.device = auto_device(args.device)
    study, eps_list, order = plan(args)
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be a positive integer")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.report_only:
        if out.exists() and any(out.glob("eps*/*/s*")) and not args.resume:
            raise ConfigError(f"--out {out} already holds ablation units; pass --resume to continue it, or another --out")
        out.mkdir(parents=True, exist_ok=True)
        where = f"{device_name(torch.device(study.device))}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
        (out / "study.json").write_text(json.dumps({**dataclasses.asdict(study), "device_name": where}, indent=1))
        t0 = time.perf_counter()
        for i, (row, eps, seed) in enumerate(order):
            gen = None
            if row == "frozen_end":
                ref = unit_dir(out, eps, "default", seed) / "unit.json"
                if not ref.exists():
                    print(f"[ablation] skip frozen_end eps {eps * 255:.3g}/255 seed {seed}: the default's unit is not "
                          "finished (run it, then --resume)", flush=True)
                    continue
                gen = frozen_end_overrides(json.loads(ref.read_text()))
            u = run_unit(study, out, row, eps, seed, resume=args.resume, progress=not args.no_progress, generator=gen)
            print(f"[ablation] {i + 1}/{len(order)} eps {eps * 255:.3g}/255 {row} seed {seed}: clean {u['clean']:.3f}, "
                  f"PGD-20 CE {u['pgd_ce']:.3f}, CW {u['pgd_cw']:.3f}, AA {u['aa'] if u['aa'] is None else round(u['aa'], 3)}, "
                  f"{u['train_seconds']:.0f} s train, {(time.perf_counter() - t0) / 60:.1f} min so far", flush=True)
    from apart_fast import ablation_report

    if args.cost_rounds > 0 and not (out / "cost.json").exists() and not args.report_only:
        measure_cost(study, out, args.cost_rounds, progress=not args.no_progress)
    command = shlex.join(["apart-fast", *args.argv]) if hasattr(args, "argv") else None
    names = ablation_report.write(out, command=command)
    print(f"[ablation] wrote in {out}: {', '.join(names)}")
    return 0
