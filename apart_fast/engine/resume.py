"""What a resume checks and restores besides the run's own state: the data's fingerprint (a resume or evaluation on
changed data is refused), the resumed config (the checkpoint's own, only ``RESUME_MAY_CHANGE`` flags may differ), the
checkpoint read back, a start over for a folder killed before its first checkpoint, and metrics.jsonl trimmed back
to the checkpoint (a kill -9 can leave lines past it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from apart_fast.config import RESUME_MAY_CHANGE, Config, ConfigError
from apart_fast.data import ImageData
from apart_fast.engine import checkpoint
from apart_fast.engine.faults import warn
from apart_fast.engine.run_folder import leftovers
from apart_fast.step.distributed import Comm


def data_fingerprint(d: ImageData) -> dict[str, Any]:
    """What a checkpoint records of its training data: sizes, image shape, classes and a sha256 of every
    image and label, so a resume on data that changed (or an evaluation at another image size) is refused."""
    digest = hashlib.sha256()
    for t in (d.train_x, d.train_y, d.test_x, d.test_y):
        digest.update(t.contiguous().numpy().data)
    return {"n_train": int(d.train_x.shape[0]), "n_test": int(d.test_x.shape[0]), "shape": list(d.train_x.shape[1:]),
            "classes": d.num_classes, "sha256": digest.hexdigest()}


def data_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """How the data a checkpoint was trained on differs from ``now`` (``data_fingerprint``s), in words."""
    names = {"n_train": "training examples", "n_test": "test examples", "shape": "image shape (C,H,W)", "classes": "classes"}
    parts = [f"{names[k]} {saved.get(k)} -> {now[k]}" for k in names if saved.get(k) != now[k]]
    return "; ".join(parts) or "same sizes, different images or labels"


def resume_config(saved: Config, cfg: Config, changed: Collection[str] | None, out: str) -> Config:
    """The resumed run's config: the checkpoint's own, with the ``RESUME_MAY_CHANGE`` fields of ``cfg``
    that were set (``changed``; None: those differing from Config()'s defaults), refusing any other change."""
    def flat(c: Config) -> dict[str, Any]:
        d = c.to_dict()
        return {**{k: v for k, v in d.items() if k != "apart"}, **{f"apart_{k}": v for k, v in d["apart"].items()}}

    old, new = flat(saved), flat(cfg)
    if changed is None:
        default = flat(Config())
        changed = {k for k in new if new[k] != default[k]}
    allowed = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
    merged = Config.from_dict(saved.to_dict())
    for name in sorted(set(changed) & set(new) - {"out"}):
        flag = "--" + name.replace("_", "-")
        if name == "epochs" and new[name] < old[name]:
            raise ConfigError(f"--epochs {new[name]} is fewer than the {old[name]} of the run in {out}; a resumed run's "
                              "--epochs may only grow: drop --epochs or pass a larger value")
        if name in RESUME_MAY_CHANGE:
            setattr(merged, name, new[name])
        elif new[name] != old[name]:
            raise ConfigError(f"{flag} {new[name]} differs from the run in {out} ({old[name]}); a resumed run keeps its "
                              f"settings except {allowed} (--epochs may only grow): drop {flag} or start a new --out")
    merged.out = out
    return merged.validate()


def restart_config(cfg: Config, changed: Collection[str] | None, comm: Comm) -> Config | None:
    """``--resume`` of a folder whose start stopped before its first checkpoint (killed in its first epoch): the config
    to start that run over with, its ``config.json``'s (``resume_config`` applies the flags given); None otherwise."""
    out = Path(cfg.out or "")
    if not leftovers(out) or not (out / "config.json").is_file():
        return None
    try:
        saved = Config.from_dict(json.loads((out / "config.json").read_text())).validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--resume {out}: its start stopped before the first checkpoint and its config.json cannot be "
                          f"read ({err}); train into it again without --resume") from None
    if comm.is_main:
        warn(f"{out} holds no checkpoint yet (its start stopped before the first one): starting that run over with "
             "the settings of its config.json")
    return resume_config(saved, cfg, changed, str(out))


def load_resume(out: Path) -> dict[str, Any]:
    """checkpoint.pt of ``out``, checked to be a full checkpoint with a readable config."""
    path = out / "checkpoint.pt"
    saved = checkpoint.load(path)
    if not isinstance(saved, dict) or saved.get("kind") != "full" or "config" not in saved:
        raise checkpoint.CheckpointError(f"{path} is not a full training checkpoint; pass the folder of an apart-fast train run")
    try:
        Config.from_dict(saved["config"]).validate()
    except (TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(f"{path} holds a config this apart_fast cannot read ({err}); "
                                         "resume it with the apart_fast version that wrote it") from None
    return saved


def trim_metrics(out: Path, step_count: int, epoch_count: int) -> list[dict[str, Any]]:
    """Drop the metrics.jsonl lines past the checkpoint (``step_count`` steps, ``epoch_count`` completed epochs; a kill -9
    can leave some) and those that are no record of a run (cut short by a kill, blank, ``null``, not JSON); return the
    kept epoch records."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    kept, history = [], []
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # cut short by a kill, or not JSON (or not UTF-8) at all
            continue
        if not isinstance(rec, dict):
            continue
        step, epoch = rec.get("step"), rec.get("epoch")
        if not isinstance(epoch, int) or ("step" in rec and not isinstance(step, int)):  # runs before "step": no key
            continue
        if step > step_count if step is not None else epoch > epoch_count:
            continue
        kept.append(line)
        if "event" not in rec:
            history.append(rec)
    checkpoint.atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    return history
