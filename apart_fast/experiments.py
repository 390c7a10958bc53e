"""Multi-run jobs behind the CLI: checkpoint evaluation and the digits demo comparison (their tables:
``report/evaluation.py``)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from apart_fast.config import MAX_INT, Config, ConfigError, check_budget
from apart_fast.data import load_dataset
from apart_fast.engine.checkpoint import CheckpointError

ATTACKS = ("pgd", "cw", "autoattack", "all")


def check_ranges(*flags: tuple[str, int | None, int]) -> None:
    """One-line ConfigError for an integer flag outside ``[low, MAX_INT]`` (None: not given)."""
    for flag, v, low in flags:
        if v is not None and not low <= v <= MAX_INT:
            raise ConfigError(f"{flag} {v} must be in [{low}, {MAX_INT}]; pass a value in that range" +
                              (" (or leave --n out for the whole test split)" if flag == "--n" else ""))


def attack_budget(eps: float | None, step: float | None, meta: dict[str, Any]) -> tuple[float, float]:
    """The attack's eps and step: as given, else the checkpoint's run's evaluation settings (``meta["run_eval"]``,
    so a model trained at --eps 0.1 is scored at 0.1), else 8/255; the step defaults to eps/4. Records the source."""
    run = meta.pop("run_eval", None) or {}
    source = "--eps"
    if eps is None:
        eps, source = (run["eps"], "the training run's --eval-eps") if run.get("eps") is not None else (8 / 255, "default 8/255")
        step = run.get("step") if step is None and run.get("eps") is not None else step
    step = eps / 4 if step is None else step
    meta["eps_source"] = source
    return float(eps), float(step)


def load_for_eval(path: str, *, dataset: str | None = None, data_dir: str | None = None, model: str | None = None,
                  n: int | None = None, device: str = "auto", seed: int = 0,
                  backend: str = "auto") -> tuple[torch.nn.Module, Tensor, Tensor, dict[str, Any]]:
    """The checkpoint's model on ``device`` and the test split (a seeded random ``n``-point subset when ``n`` is
    smaller: test splits are often class-sorted), with a description of both for the report.

    ``dataset`` None: the one the checkpoint's run trained on (with its ``data_dir`` unless one is given), else
    digits. The report's ``run_eval`` holds the run's evaluation eps and step (None for other checkpoints).
    On the run's own data (no other ``dataset`` or ``data_dir`` given) the split is drawn with the run's seed and,
    where the run read its data from its config, the data must match the fingerprint the checkpoint records."""
    from pathlib import Path

    from apart_fast import model_from_payload
    from apart_fast.engine import checkpoint
    from apart_fast.engine.device import check_backend, resolve_device
    from apart_fast.engine.resume import data_change, data_fingerprint
    from apart_fast.engine.run_folder import BACKUP

    check_ranges(("--n", n, 1), ("--seed", seed, 0))
    dev = resolve_device(device)
    check_backend(backend, dev)
    aside = Path(path).parent / BACKUP / Path(path).name
    if not Path(path).exists() and aside.is_file():
        raise CheckpointError(f"{path} does not exist but an interrupted --overwrite kept the run in {aside.parent}; "
                              f"put it back with: apart-fast train --resume {Path(path).parent}, or pass {aside}")
    payload = checkpoint.load(path, map_location="cpu")
    net = model_from_payload(payload, path)
    run = payload.get("config") or {}
    if data_dir is not None:
        data_dir = str(Path(data_dir).expanduser().absolute())
    own = dataset in (None, run.get("dataset")) and data_dir in (None, run.get("data_dir"))
    dataset = run.get("dataset", "digits") if dataset is None else dataset
    data_dir = run.get("data_dir") if own else data_dir
    trained_on = payload.get("data")  # the training data's fingerprint (checkpoints since its addition)
    name = net.config["name"]
    if model is not None and model != name:
        raise CheckpointError(f"{path} holds a {name} model, not {model}; pass --model {name} or another checkpoint")
    data = load_dataset(dataset, data_dir, seed=int(run.get("seed", seed)) if own else seed)
    if own and trained_on is not None and payload.get("data_from_config"):
        now = data_fingerprint(data)
        if now != trained_on:
            raise CheckpointError(f"{path} was trained on other data than {dataset} {data_dir or ''} holds now "
                                  f"({data_change(trained_on, now)}); pass --dataset and --data-dir of the data it was "
                                  "trained on")
    kw = net.config["kwargs"]
    if kw.get("num_classes") != data.num_classes or kw.get("in_channels") != data.channels:
        raise CheckpointError(
            f"{path} was trained for {kw.get('num_classes')} classes of {kw.get('in_channels')}-channel images; "
            f"{dataset} has {data.num_classes} of {data.channels}: pass the dataset it was trained on"
        )
    if trained_on is not None and list(trained_on["shape"]) != list(data.test_x.shape[1:]):
        _, h, w = trained_on["shape"]
        raise CheckpointError(f"{path} was trained on {h}x{w} images; {dataset} has {data.image_size[0]}x{data.image_size[1]}: "
                              "pass the dataset it was trained on (or one of the same image size)")
    x, y = data.test_x, data.test_y
    total = int(x.shape[0])
    points = "all"
    if n is not None and n < total:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 17))[:n].sort().values
        x, y = x[idx], y[idx]
        points = f"seeded random subset (seed {seed})"
    meta = {"checkpoint": path, "model": name, "width": kw.get("width"), "dataset": dataset, "n": int(x.shape[0]),
            "test_points": points, "device": str(dev),
            "run_eval": {"eps": run.get("eval_eps"), "step": run.get("eval_step")}}
    return net.to(dev), x, y, meta


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` points."""
    return (acc * (1.0 - acc) / n) ** 0.5 if n > 0 else float("nan")


def evaluate_checkpoint(path: str, *, dataset: str | None = None, data_dir: str | None = None, model: str | None = None,
                        eps: float | None = None, step: float | None = None, steps: int = 20, restarts: int = 1,
                        loss: str = "both", attack: str = "pgd", n: int | None = None, batch_size: int | None = None,
                        device: str = "auto", seed: int = 0, backend: str = "auto", aa_steps: int = 100,
                        square_queries: int = 5000, progress: bool = True) -> dict[str, Any]:
    """Clean accuracy and the chosen attacks' accuracy of a checkpoint on a dataset's test split, in eval mode.

    ``attack``: ``pgd`` (PGD with ``loss``: ce, cw or both), ``cw`` (CW-loss PGD), ``autoattack`` (standard
    L-inf AutoAttack, needs the ``[eval]`` extra) or ``all`` (CE PGD, CW PGD and AutoAttack). Each accuracy
    comes with its standard error and the attack's exact settings. ``dataset``, ``eps``, ``step`` None: the
    checkpoint's run's (``load_for_eval``, ``attack_budget``).
    """
    from apart_fast.attacks import evaluate, evaluate_autoattack
    from apart_fast.attacks.autoattack import _torchattacks

    if eps is not None:
        check_budget("--eps", eps)
    check_ranges(("--steps", steps, 0), ("--restarts", restarts, 1), ("--batch-size", batch_size, 1),
                 ("--aa-steps", aa_steps, 1), ("--square-queries", square_queries, 1))
    if attack not in ATTACKS:
        raise ValueError(f"--attack {attack!r} is unknown; choose from {', '.join(ATTACKS)}")
    if attack in ("autoattack", "all"):
        _torchattacks()  # the install hint before any data is loaded
    net, x, y, res = load_for_eval(path, dataset=dataset, data_dir=data_dir, model=model, n=n, device=device,
                                   seed=seed, backend=backend)
    eps, step = attack_budget(eps, step, res)
    res["eps"] = eps
    res["settings"] = {}
    losses = {"pgd": ("ce", "cw") if loss == "both" else (loss,), "cw": ("cw",), "autoattack": (), "all": ("ce", "cw")}
    for lo in losses[attack]:
        ev = evaluate(net, x, y, batch_size=batch_size, eps=eps, step=step, steps=steps, restarts=restarts, loss=lo,
                      progress=progress, seed=seed, backend=backend)
        res["clean_acc"] = ev["clean_acc"]
        if ev["robust_acc"] is None:  # --steps 0: clean accuracy only
            break
        res[f"pgd_{lo}_acc"] = ev["robust_acc"]
        res[f"pgd_{lo}_se"] = standard_error(ev["robust_acc"], res["n"])
        res["settings"][f"pgd_{lo}"] = {"attack": f"PGD-{steps}", "loss": lo, "eps": eps, "step": step,
                                        "steps": steps, "restarts": restarts, "random_start": True, "seed": seed,
                                        "model_mode": "eval"}
    if attack in ("autoattack", "all"):
        ev = evaluate_autoattack(net, x, y, eps, steps=aa_steps, seed=seed, batch_size=batch_size or 256,
                                 square_queries=square_queries, progress=progress)
        res["clean_acc"] = ev["clean_acc"]
        res["autoattack_acc"] = ev["robust_acc"]
        res["autoattack_se"] = standard_error(ev["robust_acc"], res["n"])
        res["settings"]["autoattack"] = {**ev["settings"], "model_mode": "eval"}
    res["clean_se"] = standard_error(res["clean_acc"], res["n"])
    return res


def eval_report(path: str, *, sanity: bool, curve: bool, dataset: str | None = None, data_dir: str | None = None,
                model: str | None = None, n: int | None = None, device: str = "auto", seed: int = 0,
                eps: float | None = None, step: float | None = None, batch_size: int | None = None, backend: str = "auto",
                aa_steps: int = 100, square_queries: int = 5000, out: str | None = None, command: str = "",
                as_json: bool = False, progress: bool = True) -> int:
    """``eval --sanity`` and/or ``--curve`` on a checkpoint: print the checks; write the curve's JSON and PNG."""
    from pathlib import Path

    from apart_fast.attacks import format_checks, plot_curves, robustness_curve, sanity_checks
    from apart_fast.attacks.autoattack import _torchattacks
    from apart_fast.report.text import device_label

    if eps is not None:
        check_budget("--eps", eps)
    check_ranges(("--batch-size", batch_size, 1), ("--aa-steps", aa_steps, 1), ("--square-queries", square_queries, 1))
    if sanity:
        _torchattacks()
    net, x, y, meta = load_for_eval(path, dataset=dataset, data_dir=data_dir, model=model, n=n, device=device,
                                    seed=seed, backend=backend)
    eps, step = attack_budget(eps, step, meta)
    report: dict[str, Any] = {**meta, "eps": eps, "command": command, "device_name": device_label(meta["device"])}
    if curve:
        folder = Path(out) if out is not None else Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        c = robustness_curve(net, x, y, eps, batch_size=batch_size or 256, seed=seed, backend=backend,
                             progress=progress)
        report["curve"] = c
        title = (f"{meta['model']} (width {meta['width']}) on {meta['dataset']}, {meta['n']} test points: "
                 f"PGD accuracy ({Path(path).name})")
        footer = f"device: {report['device_name']}  |  {command}"
        plot_curves({meta["model"]: c}, folder / "robustness_curve.png", title=title, footer=footer)
        (folder / "robustness_curve.json").write_text(json.dumps(report, indent=2))
        report["files"] = [str(folder / "robustness_curve.json"), str(folder / "robustness_curve.png")]
    if sanity:
        report["sanity"] = sanity_checks(net, x, y, eps, step=step, seed=seed, batch_size=batch_size or 256,
                                         aa_steps=aa_steps, square_queries=square_queries, backend=backend,
                                         progress=progress)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    if curve:
        c = report["curve"]
        print("eps (x/255): " + "  ".join(f"{e * 255:.3g}:{a:.3f}" for e, a in zip(c["eps_values"], c["eps_acc"])))
        print("PGD steps:   " + "  ".join(f"{k}:{a:.3f}" for k, a in zip(c["steps_values"], c["steps_acc"])))
        print(f"wrote {', '.join(report['files'])}")
    if sanity:
        print(format_checks(report["sanity"]))
    return 0


def demo_config(method: str, epochs: int, device: str, seed: int) -> Config:
    """The demo's settings on the digits data: eps 0.1 (8x8 digits need a larger budget than 8/255 to
    show robustness), a small CNN, every APART setting at its default (``--apart-schedule auto``)."""
    eps = 0.1
    return Config(method=method, dataset="digits", model="smallcnn", epochs=epochs, batch_size=128, eps=eps,
                  eval_eps=eps, eval_step=0.025, pgd_step=0.025, final_eval_steps=20, device=device, seed=seed,
                  free_replays=4)


def demo(methods: list[str], epochs: int = 15, device: str = "cpu", seed: int = 0,
         out: str | None = None, overwrite: bool = False, ema: float | None = None) -> list[dict[str, Any]]:
    """Train each method on the bundled digits data and return one row per method; with ``out``, each
    run goes to ``out/<method>``, which must not hold a run unless ``overwrite`` (checked for all first).
    With ``ema``, also the weight average's accuracies.

    The cost against PGD-10 divides the runs' process CPU time of training on the CPU (the runs are made one
    after another, so wall time would charge one method for what other jobs on the machine did meanwhile)
    and their synchronised wall time on a GPU."""
    from apart_fast.engine.device import auto_device
    from apart_fast.engine.out_dir import check_out_dir

    data = load_dataset("digits", seed=seed)
    configs = []
    for m in methods:
        cfg = demo_config(m, epochs, device, seed)
        cfg.ema = ema
        if out is not None:
            cfg.out = os.path.join(out, m)
            check_out_dir(cfg.out, resume=False, overwrite=overwrite)
        configs.append(cfg.validate())
    rows = []
    threads = torch.get_num_threads()
    if auto_device(device) == "cpu":
        # One thread: a multi-threaded process's CPU time also counts its threads spin-waiting for a core another
        # job holds, which skews the ratio on a busy machine (measured: APART 0.08x and FGSM-RS 0.13x of PGD-10).
        torch.set_num_threads(1)
    try:
        for m, cfg in zip(methods, configs):
            rows.append(_demo_row(m, cfg, data, overwrite))
    finally:
        torch.set_num_threads(threads)
    base = next((r["cost_seconds"] for r in rows if r["method"] == "pgd"), None)
    for r in rows:
        r["vs_pgd10"] = r["cost_seconds"] / base if base else None
    return rows


def _demo_row(m: str, cfg: Config, data: Any, overwrite: bool) -> dict[str, Any]:
    """Train one demo method and return its table row."""
    from apart_fast.engine.loop import train

    res = train(cfg, overwrite=overwrite, progress=True, data=data)
    cost = res["train_cpu_seconds"] if res["device"] == "cpu" else res["train_seconds"]
    return {"method": m, "clean_acc": res["test_clean_acc"], "robust_acc": res["test_robust_acc"],
            "seconds": res["train_seconds"], "cost_seconds": cost, "eval": res["eval"], "device": res["device"],
            "ema_clean_acc": res.get("ema_test_clean_acc"), "ema_robust_acc": res.get("ema_test_robust_acc")}
