"""Multi-run jobs behind the CLI: checkpoint evaluation and the digits demo comparison."""

from __future__ import annotations

import os
from typing import Any

import torch

from apart_fast.attacks import evaluate
from apart_fast.config import MAX_INT, ApartConfig, Config, ConfigError, check_budget
from apart_fast.data import load_dataset
from apart_fast.engine.checkpoint import CheckpointError

SCRIPT_STEPS = 30 * 391  # length of the APART script's run, for which its generator lr 5e-8 was tuned


def evaluate_checkpoint(path: str, *, dataset: str, data_dir: str | None = None, model: str | None = None,
                        eps: float = 8 / 255, step: float = 2 / 255, steps: int = 20, restarts: int = 1,
                        loss: str = "both", n: int | None = None, batch_size: int = 256, device: str = "cpu",
                        seed: int = 0, backend: str = "auto") -> dict[str, Any]:
    """Clean, PGD (CE) and CW-loss PGD accuracy of a checkpoint on a dataset's test split, in eval mode."""
    from apart_fast import model_from_payload
    from apart_fast.engine import checkpoint
    from apart_fast.engine.loop import check_backend, resolve_device

    check_budget("--eps", eps)
    for flag, v, low in (("--n", n, 1), ("--steps", steps, 0), ("--restarts", restarts, 1), ("--batch-size", batch_size, 1),
                         ("--seed", seed, 0)):
        if v is not None and not low <= v <= MAX_INT:
            raise ConfigError(f"{flag} {v} must be in [{low}, {MAX_INT}]; pass a value in that range" +
                              (" (or leave --n out for the whole test split)" if flag == "--n" else ""))
    dev = resolve_device(device)
    check_backend(backend, dev)
    payload = checkpoint.load(path, map_location="cpu")
    net = model_from_payload(payload, path)
    trained_on = payload.get("data")  # the training data's fingerprint (checkpoints since its addition)
    name = net.config["name"]
    if model is not None and model != name:
        raise CheckpointError(f"{path} holds a {name} model, not {model}; pass --model {name} or another checkpoint")
    data = load_dataset(dataset, data_dir, seed=seed)
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
    net = net.to(dev)
    x, y = data.test_x, data.test_y
    if n is not None:
        x, y = x[:n], y[:n]
    res: dict[str, Any] = {"checkpoint": path, "model": name, "dataset": dataset, "n": int(x.shape[0]),
                           "eps": eps, "attack": f"PGD-{steps}, step {step:.4g}, {restarts} restart(s)"}
    losses = ("ce", "cw") if loss == "both" else (loss,)
    for lo in losses:
        ev = evaluate(net, x, y, batch_size=batch_size, eps=eps, step=step, steps=steps, restarts=restarts, loss=lo,
                      device=dev, progress=True, seed=seed, backend=backend)
        res["clean_acc"] = ev["clean_acc"]
        res[f"pgd_{lo}_acc"] = ev["robust_acc"]
    return res


def scaled_generator_lr(steps: int) -> float:
    """APART's generator lr for a run of ``steps`` steps: the script's 5e-8 scaled so lr x steps is unchanged."""
    return 5e-8 * SCRIPT_STEPS / max(steps, 1)


def short_run_apart(eps: float, steps: int) -> ApartConfig:
    """APART's generator for a run far shorter than the script's 11,730 steps: the generator lr scaled so
    lr x steps equals the script's, and the input and initialisation step sizes starting at eps/2
    instead of 1e-4, so the short run is not spent growing them from nothing (the script's early
    epochs are nearly clean training)."""
    return ApartConfig(lr=scaled_generator_lr(steps), a_init=eps / 2, a_in=eps / 2)


def demo_config(method: str, epochs: int, device: str, seed: int, n_train: int | None = None) -> Config:
    """The demo's settings on the digits data: eps 0.1 (8x8 digits need a larger budget than 8/255 to
    show robustness), a small CNN, and APART adapted to the short run (``short_run_apart``).
    ``n_train``: the digits training split's size (loaded when not given), for the run's step count."""
    eps, batch_size = 0.1, 128
    if n_train is None:
        n_train = int(load_dataset("digits", seed=seed).train_x.shape[0])
    apart = short_run_apart(eps, epochs * (n_train // batch_size))
    return Config(method=method, dataset="digits", model="smallcnn", epochs=epochs, batch_size=batch_size, eps=eps,
                  eval_eps=eps, eval_step=0.025, pgd_step=0.025, final_eval_steps=20, device=device, seed=seed,
                  apart=apart, free_replays=4)


def demo(methods: list[str], epochs: int = 15, device: str = "cpu", seed: int = 0,
         out: str | None = None, overwrite: bool = False, ema: float | None = None) -> list[dict[str, Any]]:
    """Train each method on the bundled digits data and return one row per method; with ``out``, each
    run goes to ``out/<method>``, which must not hold a run unless ``overwrite`` (checked for all first).
    With ``ema``, also the weight average's accuracies."""
    from apart_fast.engine.loop import check_out_dir, train

    data = load_dataset("digits", seed=seed)
    configs = []
    for m in methods:
        cfg = demo_config(m, epochs, device, seed, n_train=int(data.train_x.shape[0]))
        cfg.ema = ema
        if out is not None:
            cfg.out = os.path.join(out, m)
            check_out_dir(cfg.out, resume=False, overwrite=overwrite)
        configs.append(cfg.validate())
    rows = []
    for m, cfg in zip(methods, configs):
        res = train(cfg, overwrite=overwrite, progress=True, data=data)
        rows.append({"method": m, "clean_acc": res["test_clean_acc"], "robust_acc": res["test_robust_acc"],
                     "seconds": res["train_seconds"], "eval": res["eval"], "device": res["device"],
                     "ema_clean_acc": res.get("ema_test_clean_acc"), "ema_robust_acc": res.get("ema_test_robust_acc")})
    base = next((r["seconds"] for r in rows if r["method"] == "pgd"), None)
    for r in rows:
        r["vs_pgd10"] = r["seconds"] / base if base else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: method, clean acc, PGD-20 acc (and the weight average's), training seconds, cost relative to PGD-10."""
    ema = any(r.get("ema_robust_acc") is not None for r in rows)
    lines = ["| method | clean acc | PGD-20 acc | " + ("EMA clean acc | EMA PGD-20 acc | " if ema else "")
             + "train s | cost vs PGD-10 |", "|---" * (7 if ema else 5) + "|"]
    for r in rows:
        rel = f"{r['vs_pgd10']:.2f}x" if r.get("vs_pgd10") is not None else "n/a"
        avg = f"{r['ema_clean_acc']:.3f} | {r['ema_robust_acc']:.3f} | " if ema else ""
        lines.append(f"| {r['method']} | {r['clean_acc']:.3f} | {r['robust_acc']:.3f} | {avg}{r['seconds']:.1f} | {rel} |")
    dev = rows[0]["device"] if rows else "?"
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "CPU"
    return "\n".join(lines) + f"\n\nDevice: {name}; evaluation {rows[0]['eval'] if rows else ''} on the test split."
