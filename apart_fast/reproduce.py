"""``apart-fast reproduce``: the paper's comparison (clean, FGSM, FGSM-RS, Free, PGD-10, APART) and today's fast
competitors (N-FGSM, GradAlign) in one command; ``--ema DECAY`` also evaluates every method's weight average.

Writes ``OUT/<method>/`` (one ``train`` run each, metrics.jsonl with the per-epoch probe), ``OUT/results.md``
(the table: clean, PGD-20, CW PGD-20 and AutoAttack per method), ``OUT/results.json`` and PNG figures:
robust accuracy per epoch, the perturbation-strength ratio per epoch, APART's step sizes, one robustness
curve per method (accuracy against eps and against PGD steps), and with ``--long-fgsm`` a long FGSM run
beside APART's. AutoAttack and the curves use all test points on a GPU, a seeded subset on the CPU.
Presets are documented on ``PRESETS``; the study they feed is ``apart_fast/diagnostics/STUDY.md``.
This module trains and measures; the table and figures are drawn by ``report/comparison.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apart_fast.config import METHODS, ApartConfig, Config, ConfigError, check_budget, float_or_fraction
from apart_fast.data import ImageData, load_dataset
from apart_fast.report.comparison import aa_cell, format_table, plot_all
from apart_fast.report.text import device_label, num

CIFAR_JPEG = "../shared/data/cifar10-jpeg.tar.gz"
@dataclass(frozen=True)
class Preset:
    """One comparison setting. Subsets are seeded random draws (the stored datasets are class-sorted)."""

    dataset: str
    model: str
    width: int
    epochs: int
    batch_size: int
    lr: float  # peak of the cyclic learning rate
    eps: float
    train_subset: int | None  # None: the whole training split
    test_subset: int | None  # None: the whole test split (final PGD-20, CW PGD-20, best checkpoint)
    eval_n: int  # validation slice (training-split images held out of training) for the per-epoch PGD-10
    eval_steps: int
    final_eval_steps: int
    long_epochs: int  # --long-fgsm: epochs of the long FGSM and APART runs
    methods: tuple[str, ...]
    data_dir: str | None = None
    needs_gpu: bool = False
    synthetic_size: int = 1024
    aa_n_cpu: int = 200  # AutoAttack and the curves on the CPU: a seeded random subset of this many test points
    aa_steps: int = 100  # AutoAttack's APGD/FAB iterations (100: the standard version)
    aa_square_queries: int = 5000  # AutoAttack's Square queries (5000: the standard version)
    eval_eps: float | None = None  # None: eps
    pgd_step: float | None = None  # PGD-10 training's step; None: eps/4
    shortcut: str = "act"
    keep_last_batch: bool = False
    amp: str = "auto"
    apart_schedule: str = "auto"
    legacy_model_decay: bool = False


PRESETS: dict[str, Preset] = {
    # The authors' run (their released script, ../shared/APART.md): CIFAR-10, their PreAct ResNet-18 (width 64,
    # projection shortcut from the raw block input), 30 epochs of batch 128 keeping the last partial batch
    # (391 steps), cyclic lr 0 -> 0.2 -> 0, training eps 0.031, evaluation eps 8/255, fp32, APART's generator
    # exactly the script's (schedule script, PyTorch 1.3's extra decay of the step sizes by the model's SGD); every
    # one of the 50,000 training images is trained on (391 steps per epoch, 11,730 in all: no validation slice) and
    # the last model is scored, as the authors did. Needs a GPU (~hours of CPU per epoch).
    "paper": Preset("cifar10", "preact18", 64, 30, 128, 0.2, 0.031, None, None, 0, 10, 20, 60, METHODS,
                    CIFAR_JPEG, needs_gpu=True, eval_eps=8 / 255, pgd_step=2 / 255, shortcut="raw", keep_last_batch=True, amp="none",
                    apart_schedule="script", legacy_model_decay=True),
    # The reduced CPU setting (2 cores, < 1 hour for the paper's six methods on an idle VM; N-FGSM costs what FGSM-RS does and
    # GradAlign ~3.2x that, README): CIFAR-10 (JPEG), a random 4,000-image
    # training subset, PreAct ResNet-18 of width 8 (1/64 of the paper's FLOPs), 8 epochs of batch 128
    # (248 steps), cyclic lr to 0.2, eps 8/255; per epoch PGD-10 on 256 validation images (training split,
    # held out of training: 3,744 are trained on); final PGD-20
    # and CW PGD-20 on a random 500-image test subset. --long-fgsm adds 20-epoch FGSM and APART runs.
    # APART at its defaults (schedule auto: the script's generator in units of eps, README "The default rule").
    "cpu": Preset("cifar10", "preact18", 8, 8, 128, 0.2, 8 / 255, 4000, 500, 256, 10, 20, 20, METHODS, CIFAR_JPEG),
    # A smoke test: synthetic 16x16 data, a width-4 small CNN, one epoch, two methods (seconds).
    # AutoAttack there is cut to 5 iterations and 50 Square queries on 32 points (not the standard version).
    "tiny": Preset("synthetic", "smallcnn", 4, 1, 32, 0.2, 8 / 255, 128, 64, 32, 2, 2, 2, ("fgsm_rs", "apart"),
                   synthetic_size=256, aa_n_cpu=32, aa_steps=5, aa_square_queries=50),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reproduce subcommand's options; unset ones take the preset's value."""
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="setting (default cpu; see STUDY.md)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}, or none (default: the preset's)")
    p.add_argument("--out", help="results folder (default reproduce-<preset>-<timestamp>)")
    p.add_argument("--data-dir", help=f"dataset folder or archive (cifar presets: {CIFAR_JPEG})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--width", type=int, help="override the preset's model width")
    p.add_argument("--eps", type=float_or_fraction, help="override the preset's eps for training and evaluation (e.g. 16/255)")
    p.add_argument("--train-subset", type=int, help="train on a seeded random N-image subset (0: all)")
    p.add_argument("--test-subset", type=int, help="final evaluations on a seeded random N-image test subset (0: all)")
    p.add_argument("--aa-n", type=int,
                   help="AutoAttack and curve points (default: all test points on a GPU, the preset's subset on the CPU)")
    p.add_argument("--long-fgsm", action="store_true", help="add long FGSM (zero init) and APART runs and their figure")
    p.add_argument("--long-epochs", type=int, help="epochs of the --long-fgsm runs (default: the preset's)")
    p.add_argument("--long-fgsm-step", type=float, default=1.0,
                   help="the long FGSM step in units of eps (default 1; from zero init any step >= 1 is the same run)")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="also train an EMA of the weights (e.g. 0.999, with --ema-warmup) and evaluate it beside the last model")
    p.add_argument("--ema-warmup", type=float, default=10.0, help="EMA warm-up W: decay min(DECAY, n/(n+W)) at update n")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="keep sub-runs in --out that already have results.json, resume those with only a checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs and results already in --out (each run kept until its replacement's first epoch)")
    p.add_argument("--force", action="store_true", help="run --preset paper even without a GPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def command_line(args: argparse.Namespace) -> str:
    """The exact, canonical command that reproduces this run (every option that was set)."""
    parts = ["apart-fast", "reproduce", "--preset", args.preset]
    for name in ("methods", "out", "data_dir", "device", "epochs", "width", "train_subset", "test_subset",
                 "aa_n", "long_epochs"):
        v = getattr(args, name)
        if v is not None and not (name == "device" and v == "auto"):
            parts += ["--" + name.replace("_", "-"), str(v)]
    if args.eps is not None:
        parts += ["--eps", f"{args.eps * 255:g}/255"]
    if args.ema is not None:
        parts += ["--ema", f"{args.ema:g}", "--ema-warmup", f"{args.ema_warmup:g}"]
    if args.long_fgsm:
        parts += ["--long-fgsm", "--long-fgsm-step", f"{args.long_fgsm_step:g}"]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    parts += [f"--{f}" for f in ("resume", "overwrite", "force") if getattr(args, f)]
    return shlex.join(parts)


def subset(data: ImageData, n_train: int | None, n_test: int | None, seed: int) -> ImageData:
    """``data`` restricted to seeded random subsets of its splits (None or 0: the whole split)."""
    g = torch.Generator().manual_seed(seed + 17)

    def pick(n_all: int, n: int | None, flag: str) -> torch.Tensor | None:
        if not n or n >= n_all:
            return None
        if n < 1:
            raise ConfigError(f"{flag} {n} is negative; pass a positive size, or 0 for the whole split")
        return torch.randperm(n_all, generator=g)[:n].sort().values

    tr = pick(int(data.train_x.shape[0]), n_train, "--train-subset")
    te = pick(int(data.test_x.shape[0]), n_test, "--test-subset")
    out = data
    if tr is not None:
        out = dataclasses.replace(out, train_x=data.train_x[tr].contiguous(), train_y=data.train_y[tr].contiguous())
    if te is not None:
        out = dataclasses.replace(out, test_x=data.test_x[te].contiguous(), test_y=data.test_y[te].contiguous())
    return out


def method_config(method: str, preset: Preset, *, epochs: int, width: int, n_train: int, device: str, seed: int,
                  data_dir: str | None, out: str | None, fgsm_step: float | None = None, ema: float | None = None,
                  ema_warmup: float = 10.0) -> Config:
    """The Config of one sub-run: the preset's settings, APART's generator by the preset's schedule."""
    apart = ApartConfig(schedule=preset.apart_schedule, legacy_model_decay=preset.legacy_model_decay)
    return Config(method=method, dataset=preset.dataset, data_dir=data_dir, model=preset.model, width=width,
                  shortcut=preset.shortcut, epochs=epochs, batch_size=preset.batch_size,
                  keep_last_batch=preset.keep_last_batch, eps=preset.eps, lr=preset.lr,
                  eval_eps=_pick(preset.eval_eps, preset.eps), eval_n=preset.eval_n, eval_steps=preset.eval_steps,
                  final_eval_steps=preset.final_eval_steps, amp=preset.amp, device=device, seed=seed, out=out,
                  fgsm_step=fgsm_step, pgd_step=preset.pgd_step, ema=ema, ema_warmup=ema_warmup, apart=apart).resolved()


def _evaluate(model: torch.nn.Module, cfg: Config, data: ImageData, loss: str) -> dict[str, Any]:
    from apart_fast.attacks import evaluate

    return evaluate(model, data.test_x, data.test_y, batch_size=max(cfg.batch_size, 256), eps=cfg.eval_eps,
                    step=cfg.eval_step, steps=cfg.final_eval_steps, loss=loss, device=cfg.device, seed=cfg.seed,
                    backend=cfg.backend)


def robust_extras(model: torch.nn.Module, cfg: Config, data: ImageData, preset: Preset, aa_n: int | None,
                  progress: bool) -> dict[str, Any]:
    """AutoAttack accuracy (with its standard error) and the robustness curves of ``model`` on a seeded random
    subset of ``aa_n`` test points (None: all). Without torchattacks the AutoAttack entries are None."""
    from apart_fast.attacks import MissingExtraError, evaluate_autoattack, robustness_curve
    from apart_fast.experiments import standard_error

    x, y = data.test_x, data.test_y
    if aa_n is not None and aa_n < int(x.shape[0]):
        idx = torch.randperm(int(x.shape[0]), generator=torch.Generator().manual_seed(cfg.seed + 29))[:aa_n]
        x, y = x[idx.sort().values], y[idx.sort().values]
    n = int(x.shape[0])
    out: dict[str, Any] = {"aa_n": n, "aa_acc": None, "aa_se": None, "aa_settings": None,
                           "curve": robustness_curve(model, x, y, cfg.eval_eps, batch_size=256, seed=cfg.seed,
                                                     backend=cfg.backend)}
    try:
        ev = evaluate_autoattack(model, x, y, cfg.eval_eps, steps=preset.aa_steps, seed=cfg.seed,
                                 square_queries=preset.aa_square_queries, progress=progress)
    except MissingExtraError as err:
        out["aa_note"] = str(err)
        return out
    out.update(aa_acc=ev["robust_acc"], aa_se=standard_error(ev["robust_acc"], n), aa_settings=ev["settings"])
    return out


def run_one(name: str, cfg: Config, data: ImageData, *, resume: bool, progress: bool, preset: Preset | None = None,
            aa_n: int | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, reuse) one sub-run, then evaluate its last and best checkpoints; with
    ``preset``, also AutoAttack and the robustness curves of the last one (``robust_extras``)."""
    from apart_fast import load_model
    from apart_fast.engine.checkpoint import is_run_checkpoint
    from apart_fast.engine.loop import train

    out = Path(cfg.out)
    cached = out / "reproduce_row.json"
    if resume and cached.exists():
        return {**json.loads(cached.read_text()), "name": name}
    if resume and (out / "results.json").exists():
        res = json.loads((out / "results.json").read_text())
    else:  # ``run`` checked the folder: a run here is one to resume (--resume) or to replace (--overwrite)
        again = resume and is_run_checkpoint(out / "checkpoint.pt")
        res = train(cfg, resume=again, overwrite=not again, progress=progress, data=data)
        res.pop("model", None)
        res.pop("model_ema", None)
    dev = torch.device(cfg.device)
    last = load_model(str(out / "model.pt")).to(dev)
    row: dict[str, Any] = {
        "name": name, "method": cfg.method, "epochs": res["epochs"], "train_seconds": res["train_seconds"],
        "clean_acc": res["test_clean_acc"], "pgd20_acc": res["test_robust_acc"],
        "cw20_acc": _evaluate(last, cfg, data, "cw")["robust_acc"] if cfg.final_eval_steps else None,
        "best_epoch": res["best_epoch"], "last_epoch": res["epochs"],
        "best_holdout_robust": res["best_holdout_robust_acc"],
        "last_holdout_robust": res["history"][-1].get("holdout_robust_acc"),
        "test_n": res["test_n"], "history": res["history"], "passes_per_step": res["passes_per_step"],
        "data_passes_divisor": cfg.free_replays if cfg.method == "free" else 1,
        "ema_clean_acc": res.get("ema_test_clean_acc"), "ema_pgd20_acc": res.get("ema_test_robust_acc"),
    }
    if preset is not None:
        row.update(robust_extras(last, cfg, data, preset, aa_n, progress))
    if res["best_epoch"] == res["epochs"] or not (out / "model_best.pt").exists():
        row["best_clean_acc"], row["best_pgd20_acc"] = row["clean_acc"], row["pgd20_acc"]
    else:
        ev = _evaluate(load_model(str(out / "model_best.pt")).to(dev), cfg, data, "ce")
        row["best_clean_acc"], row["best_pgd20_acc"] = ev["clean_acc"], ev["robust_acc"]
    cached.write_text(json.dumps(row))
    return row


OUTPUTS = ("results.md", "results.json", "robust_acc.png", "strength_ratio.png", "robustness_curves.png",
           "apart_step_sizes.png", "long_fgsm.png")  # what ``run`` writes into --out beside the runs


def check_reproduce_out(out: Path, names: list[str], resume: bool, overwrite: bool) -> None:
    """ConfigError unless ``out`` can take this comparison: not a train run's own folder; without ``resume`` or
    ``overwrite``, no earlier results and no run in any ``out/<name>``; no files a run did not write there."""
    from apart_fast.engine.out_dir import check_out_dir
    from apart_fast.engine.run_folder import run_files

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    held = run_files(out)
    if held:
        raise ConfigError(f"--out {out} is the folder of a train run ({held[0]}); reproduce writes a table and one "
                          "folder per method: pass another --out")
    done = [f for f in OUTPUTS if (out / f).exists()]
    if done and not (resume or overwrite):
        raise ConfigError(f"--out {out} already holds results ({done[0]}); pass --resume to keep its finished runs, "
                          "--overwrite to replace them, or another --out")
    for name in names:
        check_out_dir(str(out / name), resume=False, overwrite=resume or overwrite)


def run(args: argparse.Namespace) -> int:
    """Train every method of the preset, evaluate, write results.md, results.json and the figures."""
    t_start = time.perf_counter()
    preset = PRESETS[args.preset]
    if args.eps is not None:
        check_budget("--eps", args.eps)
        preset = dataclasses.replace(preset, eps=args.eps, eval_eps=None)
    from apart_fast.engine.device import auto_device

    device = auto_device(args.device)
    if preset.needs_gpu and not device.startswith("cuda") and not args.force:
        raise ConfigError(f"--preset {args.preset} needs a GPU (none found, device {device}); use --preset cpu, "
                          "or pass --force to run it on the CPU anyway")
    methods = tuple(m for m in args.methods.split(",") if m and m != "none") if args.methods else preset.methods
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {', '.join(bad)}; choose from {','.join(METHODS)}")
    if args.out is None:
        args.out = f"reproduce-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out)
    names = [*methods, *(("long_fgsm", "long_apart") if args.long_fgsm else ())]
    check_reproduce_out(out, names, args.resume, args.overwrite)
    from apart_fast.engine.run_folder import FolderLock

    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    try:
        lock.acquire()  # one reproduce per folder; each sub-run locks its own
        check_reproduce_out(out, names, args.resume, args.overwrite)  # again, locked
        return _run_all(args, preset, methods, device, out, t_start)
    finally:
        lock.release()
        if made and not any(out.iterdir()):  # a failed start leaves no folder behind
            out.rmdir()


def _run_all(args: argparse.Namespace, preset: Preset, methods: tuple[str, ...], device: str, out: Path,
             t_start: float) -> int:
    """``run`` after its checks, with ``out`` locked: every sub-run, the table, the figures."""
    epochs, width = _pick(args.epochs, preset.epochs), _pick(args.width, preset.width)
    long_epochs = _pick(args.long_epochs, preset.long_epochs)
    data_dir = args.data_dir or preset.data_dir
    info: dict[str, Any] = {"preset": args.preset, "command": command_line(args), "device": device,
                            "device_name": device_label(device), "torch": torch.__version__}
    data = load_dataset(preset.dataset, data_dir, seed=args.seed, synthetic_size=preset.synthetic_size)
    data = subset(data, _pick(args.train_subset, preset.train_subset), _pick(args.test_subset, preset.test_subset),
                  args.seed)
    n_train = int(data.train_x.shape[0])
    info["settings"] = {"dataset": preset.dataset, "data_dir": data_dir, "n_train": n_train,
                        "n_test": int(data.test_x.shape[0]), "model": preset.model, "width": width, "epochs": epochs,
                        "batch_size": preset.batch_size, "lr": preset.lr, "eps": preset.eps, "eval_n": preset.eval_n,
                        "long_epochs": long_epochs if args.long_fgsm else None,
                        "long_fgsm_step_eps": args.long_fgsm_step if args.long_fgsm else None,
                        "ema": args.ema, "ema_warmup": args.ema_warmup}
    common = dict(width=width, n_train=n_train, device=device, seed=args.seed, data_dir=data_dir, ema=args.ema,
                  ema_warmup=args.ema_warmup)
    aa_n = args.aa_n if args.aa_n is not None else (None if device.startswith("cuda") else preset.aa_n_cpu)
    if aa_n is not None and aa_n < 1:
        raise ConfigError(f"--aa-n {aa_n} is not positive; pass the number of AutoAttack test points")
    rows: list[dict[str, Any]] = []
    for m in methods:
        cfg = method_config(m, preset, epochs=epochs, out=str(out / m), **common)
        rows.append(run_one(m, cfg, data, resume=args.resume, progress=not args.no_progress, preset=preset,
                            aa_n=aa_n))
        ema = f", EMA PGD-20 {num(rows[-1]['ema_pgd20_acc'])}" if args.ema is not None else ""
        print(f"[reproduce] {m}: clean {rows[-1]['clean_acc']:.3f}, PGD-20 {num(rows[-1]['pgd20_acc'])}{ema}, "
              f"AutoAttack {aa_cell(rows[-1])}, {rows[-1]['train_seconds']:.0f} s", flush=True)
    long_rows: list[dict[str, Any]] = []
    if args.long_fgsm:
        cfg = method_config("fgsm", preset, epochs=long_epochs, out=str(out / "long_fgsm"),
                            fgsm_step=args.long_fgsm_step * preset.eps, **common)
        long_rows.append(run_one("long_fgsm", cfg, data, resume=args.resume, progress=not args.no_progress))
        main_apart = next((r for r in rows if r["method"] == "apart"), None)
        if main_apart is not None and long_epochs == epochs:
            long_rows.append({**main_apart, "name": "long_apart"})
        else:
            cfg = method_config("apart", preset, epochs=long_epochs, out=str(out / "long_apart"), **common)
            long_rows.append(run_one("long_apart", cfg, data, resume=args.resume, progress=not args.no_progress))
    info["wall_seconds"] = time.perf_counter() - t_start
    table = format_table(rows + long_rows, info)
    (out / "results.md").write_text(table)
    info["figures"] = plot_all(rows, long_rows, info, out)
    (out / "results.json").write_text(json.dumps({**info, "rows": rows, "long_rows": long_rows}, indent=2))
    print(table)
    print(f"[reproduce] wrote {out}/results.md, results.json, {', '.join(info['figures'])}")
    return 0
