"""Argument parsing only: every subcommand calls into the library. ``apart-fast`` == ``python -m apart_fast``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import shlex
import sys
from pathlib import Path

from apart_fast.config import (
    AMP_MODES,
    APART_SCHEDULES,
    DATASET_DEFAULTS,
    DATASETS,
    METHODS,
    MODELS,
    RESUME_MAY_CHANGE,
    SHORTCUTS,
    SMALL_IMAGE,
    STEMS,
    STORE_DTYPES,
    TORCHVISION,
    ApartConfig,
    Config,
    ConfigError,
    float_or_fraction,
    integer,
)
from apart_fast.engine.out_dir import AUTO_OUT
from apart_fast.engine.run_folder import BACKUP
from apart_fast.experiments import ATTACKS

# Help for fields whose comment in config.py is not enough on its own.
HELP = {
    "dataset": "dataset name; 'digits' is bundled (no download)",
    "data_dir": "folder or .tar.gz in ImageFolder layout with train/ and test/, or torchvision's CIFAR folder",
    "model": f"architecture: {', '.join(MODELS)}, or {TORCHVISION}NAME (any torchvision classification model, e.g. "
             f"{TORCHVISION}resnet18; APART hooks its sites on, see --apart-sites)",
    "width": "first stage's channels (preact18: 64 is the paper's)",
    "epochs": "passes over the training data",
    "device": "auto (cuda when available, else cpu; the log names the one used), cpu, cuda or cuda:N",
    "out": "output folder (metrics.jsonl, model.pt, checkpoint.pt, results.json), named in the first and last log lines",
}
# The train flags whose default is not their Config field's: (the CLI's value, its help text).
CLI_DEFAULTS = {"out": (AUTO_OUT, f"{AUTO_OUT}: a fresh runs/<method>-<dataset>-<date-time>/; none: save nothing")}
# Subcommands that live beside their library code: (name, module with add_arguments/run, help).
EXTENSIONS = (
    ("bench", "apart_fast.bench.cli", "kernel throughput and training cost against PGD-10"),
    ("reproduce", "apart_fast.reproduce", "the paper's comparison: every method, one table, plots"),
    ("ablation", "apart_fast.ablation", "what each part of APART buys: its ablations at several eps and seeds"),
)
CHOICES = {"method": METHODS, "dataset": DATASETS, "pad_mode": ("constant", "reflect"), "amp": AMP_MODES,
           "schedule": APART_SCHEDULES, "shortcut": SHORTCUTS, "stem": STEMS, "store_dtype": STORE_DTYPES}


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in ``cls``'s source: config.py documents every knob once."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def by_dataset(field: str) -> str:
    """The default of ``model``, ``width`` or ``epochs`` on each dataset, in words (from config.DATASET_DEFAULTS)."""
    i = ("model", "width", "epochs").index(field)
    groups: dict[str, list[str]] = {}
    for name, values in DATASET_DEFAULTS.items():
        groups.setdefault(str(values[i]), []).append(name)
    parts = [f"{'/'.join(names)} {value}" for value, names in groups.items()]
    small, large = DATASET_DEFAULTS["digits"][i], DATASET_DEFAULTS["cifar10"][i]
    text = "by --dataset: " + ", ".join(parts) + f", imagefolder {small} for images under {SMALL_IMAGE} px, else {large}"
    return text + ("; with --model given, that model's own" if field == "width" else "")


def _add_fields(p: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One --flag per dataclass field, help from its config.py comment; bools get --flag / --no-flag."""
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name == "apart":
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        dest = prefix + f.name
        default, shown = CLI_DEFAULTS.get(dest, (f.default, f.default))
        if cls is Config and f.name in ("model", "width", "epochs"):
            shown = by_dataset(f.name)
        text = HELP.get(prefix + f.name) or comments.get(f.name, "")
        help_ = text.replace("%", "%%") + (f" (default {shown:.4g})" if isinstance(shown, float) and
                                            not isinstance(shown, bool) else f" (default {shown})")
        if isinstance(default, bool) or f.type in ("bool", "bool | None"):
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.type in ("int", "int | None"):
            p.add_argument(flag, dest=dest, type=integer, default=default, help=help_)
        elif f.type in ("float", "float | None"):
            p.add_argument(flag, dest=dest, type=float_or_fraction, default=default, help=help_)
        else:
            p.add_argument(flag, dest=dest, default=default, choices=CHOICES.get(f.name), help=help_)


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's Config from parsed train arguments."""
    values = vars(args)
    apart = ApartConfig(**{f.name: values["apart_" + f.name] for f in dataclasses.fields(ApartConfig)})
    kw = {f.name: values[f.name] for f in dataclasses.fields(Config) if f.name != "apart"}
    if kw["out"] is not None and kw["out"].lower() == "none":  # --out none: save nothing (./none is a folder named none)
        kw["out"] = None
    return Config(apart=apart, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``apart-fast`` parser: train, eval, demo and the extension subcommands."""
    parser = argparse.ArgumentParser(prog="apart-fast", description="APART adversarial training, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model with one method")
    _add_fields(t, Config)
    _add_fields(t, ApartConfig, prefix="apart_")
    may_change = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint.pt with its own settings; "
                   f"only {may_change} and --no-progress may change (--epochs only upwards)")
    t.add_argument("--overwrite", action="store_true",
                   help=f"replace the run already in --out (kept in --out/{BACKUP}/ until the new run has finished an epoch)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bars and no log lines: errors and the final JSON only (without a terminal, "
                        "bars are off anyway and the log is one line per epoch)")

    e = sub.add_parser("eval", help="clean, PGD, CW-loss PGD and AutoAttack accuracy of a checkpoint; sanity checks; "
                                    "robustness curves")
    e.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt written by apart-fast train")
    e.add_argument("--dataset", choices=DATASETS,
                   help="default: the dataset (and --data-dir) the checkpoint's run trained on; digits for other checkpoints")
    e.add_argument("--data-dir")
    e.add_argument("--model", help=f"refuse the checkpoint unless it holds this model ({', '.join(MODELS)}, {TORCHVISION}NAME)")
    e.add_argument("--attack", choices=ATTACKS, default="pgd",
                   help="pgd: PGD with --loss; cw: CW-loss PGD; autoattack: standard L-inf AutoAttack (needs "
                        "pip install 'apart_fast[eval]'); all: CE PGD, CW PGD and AutoAttack (default pgd)")
    e.add_argument("--eps", type=float_or_fraction,
                   help="L-inf budget (default: the checkpoint's run's --eval-eps, else 8/255)")
    e.add_argument("--step", type=float_or_fraction, help="PGD step (default: the run's --eval-step with its eps, else eps/4)")
    e.add_argument("--steps", type=integer, default=20)
    e.add_argument("--restarts", type=integer, default=1)
    e.add_argument("--loss", choices=("ce", "cw", "both"), default="both", help="PGD's loss for --attack pgd")
    e.add_argument("--aa-steps", type=integer, default=100,
                   help="iterations of AutoAttack's APGD-CE, APGD-T and FAB-T (default 100, the standard version's; "
                        "torchattacks' own default is 10)")
    e.add_argument("--square-queries", type=integer, default=5000, help="AutoAttack's Square queries (default 5000)")
    e.add_argument("--n", type=integer, default=None, help="evaluate a seeded random subset of N test points")
    e.add_argument("--batch-size", type=integer, default=None, help="default: sized to the device")
    e.add_argument("--device", default="auto", help=HELP["device"])
    e.add_argument("--seed", type=integer, default=0)
    e.add_argument("--backend", default="auto")
    e.add_argument("--sanity", action="store_true",
                   help="run the gradient-masking checks instead (large eps, more steps/restarts, black-box Square, "
                        "FGSM, AutoAttack gap), each PASS/FAIL with its numbers")
    e.add_argument("--curve", action="store_true",
                   help="write accuracy against eps and against PGD steps to OUT/robustness_curve.json and .png")
    e.add_argument("--out", help="folder for --curve's files (default: the checkpoint's folder)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    for name, module, help_ in EXTENSIONS:
        ext = importlib.import_module(module)
        ext.add_arguments(sub.add_parser(name, help=help_, description=help_))

    d = sub.add_parser("demo", help="APART vs PGD-10 vs FGSM-RS vs clean on the bundled digits data (CPU)")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--methods", default="clean,fgsm_rs,pgd,apart",
                   help=f"comma-separated, from {','.join(METHODS)} (e.g. add nfgsm,gradalign for today's competitors)")
    d.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also evaluate each method's weight average (train --ema), e.g. 0.99 for the demo's short runs")
    d.add_argument("--out", default=None, help="also write each run into OUT/<method>")
    d.add_argument("--overwrite", action="store_true", help="replace runs already in OUT/<method>")
    d.add_argument("--device", default="auto", help=HELP["device"])
    d.add_argument("--seed", type=integer, default=0)
    debug = "show the traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    parser.train_parser = t  # type: ignore[attr-defined]  # _given_flags reads the train options
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; every expected failure is one line on stderr and an exit code, no traceback
    (``--debug`` shows it).

    Exit codes: 0 done; 2 bad input or a failed start (config, data, checkpoint, output folder,
    backend, a missing extra, out of memory before training: nothing written); 1 the run failed midway (repeated
    numeric faults, an OSError such as a full disk, out of memory; the message names the checkpoint
    it left); 130/143 interrupted by SIGINT/SIGTERM (a checkpoint was written).
    """
    from apart_fast.attacks.autoattack import MissingExtraError
    from apart_fast.engine.faults import NumericFaultError, RunFailedError, TrainingInterrupted, is_out_of_memory

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a path the locale cannot encode is printed, not a crash
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return _dispatch(args, argv)
    except TrainingInterrupted as err:
        print(f"apart-fast: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("apart-fast: interrupted; nothing from this step on was saved", file=sys.stderr)
        return 130
    except (NumericFaultError, RunFailedError) as err:
        return _fail(args, err, _one_line(err), 1)
    except UnicodeError as err:  # a name from the command line (undecodable under LANG=C) that some write cannot encode
        what = ascii(err.object)[:200]
        return _fail(args, err, f"{what} holds characters that cannot be encoded ({err.reason}); rename it with UTF-8 "
                                "characters or run under a UTF-8 locale (LANG=C.UTF-8)", 2)
    except (ValueError, MissingExtraError) as err:  # ConfigError, DataError, CheckpointError; a missing [eval] extra
        return _fail(args, err, _one_line(err), 2)
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        return _fail(args, err, f"cannot use{where} ({err.strerror or err}); check the path, its permissions and free "
                                "disk space", 2)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        return _fail(args, err, f"out of memory ({_one_line(err) or type(err).__name__}); lower --batch-size or "
                                "use a device with more memory", 2)


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the chosen subcommand and return its exit code."""
    if args.command == "train":
        args.given = _given_flags(argv)
        return _train(args)
    if args.command == "eval":
        args.argv = argv
        return _eval(args)
    if args.command == "demo":
        return _demo(args)
    module = {name: module for name, module, _ in EXTENSIONS}[args.command]
    args.argv = argv
    return importlib.import_module(module).run(args)


def _fail(args: argparse.Namespace, err: BaseException, message: str, code: int) -> int:
    """Print ``message`` as one error line and return ``code``; under ``--debug`` re-raise ``err`` instead."""
    if getattr(args, "debug", False):
        raise err
    print(f"apart-fast: error: {message}", file=sys.stderr)
    return code


def _given_flags(argv: list[str]) -> set[str]:
    """Destinations of the train options written on the command line (not left at their defaults).

    argparse itself decides, so abbreviations (``--epoch 5``) and ``--no-`` forms count: a parser
    whose train options have no defaults sets only the ones that were given.
    """
    parser = build_parser()
    for action in parser.train_parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "debug"}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _train(args: argparse.Namespace) -> int:
    from apart_fast.engine.loop import train

    if args.resume:
        if "out" in args.given and Path(args.out).absolute() != Path(args.resume).absolute():
            raise ConfigError(f"--out {args.out} differs from --resume {args.resume}: a resumed run continues in its own "
                              f"folder; drop --out (or copy {args.resume} to {args.out} and resume that)")
        args.out = args.resume
    cfg = config_from_args(args)
    res = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress,
                changed=args.given if args.resume else None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(json.dumps({k: v for k, v in res.items() if k not in ("model", "model_ema", "history")}, indent=2))
        if not args.no_progress:
            saved = f"the run is in {res['out']}" if res["out"] else "--out none: nothing was saved"
            print(f"apart-fast: {saved}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from apart_fast import experiments
    from apart_fast.report.evaluation import format_eval

    common = dict(dataset=args.dataset, data_dir=args.data_dir, model=args.model, n=args.n, device=args.device,
                  seed=args.seed)
    if args.sanity or args.curve:
        return experiments.eval_report(args.checkpoint, sanity=args.sanity, curve=args.curve, eps=args.eps,
                                       step=args.step, batch_size=args.batch_size, backend=args.backend,
                                       aa_steps=args.aa_steps, square_queries=args.square_queries, out=args.out,
                                       command=shlex.join(["apart-fast", *args.argv]), as_json=args.json,
                                       progress=not args.no_progress, **common)
    res = experiments.evaluate_checkpoint(args.checkpoint, eps=args.eps, step=args.step, steps=args.steps,
                                          restarts=args.restarts, loss=args.loss, attack=args.attack,
                                          batch_size=args.batch_size, backend=args.backend, aa_steps=args.aa_steps,
                                          square_queries=args.square_queries, progress=not args.no_progress, **common)
    print(json.dumps(res, indent=2) if args.json else format_eval(res))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from apart_fast.experiments import demo
    from apart_fast.report.evaluation import format_table

    rows = demo(methods=args.methods.split(","), epochs=args.epochs, device=args.device, seed=args.seed, out=args.out,
                overwrite=args.overwrite, ema=args.ema)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
