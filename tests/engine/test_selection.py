"""Model selection on a validation slice carved from the training split, the last partial batch, the
training subset and ``--device auto``."""

from __future__ import annotations

import json

import torch

from apart_fast.config import Config
from apart_fast.data import load_dataset
from apart_fast.engine.device import resolve_device
from apart_fast.engine.loop import train
from apart_fast.engine.run import Run


def _cfg(**kw) -> Config:
    base = dict(method="clean", dataset="synthetic", batch_size=64, epochs=1, eval_n=40, eval_steps=1,
                final_eval_steps=0, device="cpu")
    return Config(**{**base, **kw})


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.flatten().tolist()) for r in x}


def test_validation_slice_is_training_split_and_not_trained_on():
    data = load_dataset("synthetic", seed=0, synthetic_size=256)
    run = Run(_cfg(), data=data)
    n = int(data.train_x.shape[0])
    assert run.val_x.shape[0] == min(40, n // 10) and run.train_x.shape[0] == n - run.val_x.shape[0]
    val, trained, test = _rows(run.val_x), _rows(run.loader.x.cpu()), _rows(data.test_x)
    assert val <= _rows(data.train_x) and not val & trained and not val & test
    again = Run(_cfg(), data=data)
    assert torch.equal(again.val_x, run.val_x)  # seeded: the same slice on resume


def test_results_say_how_the_best_model_was_chosen(tmp_path):
    res = train(_cfg(out=str(tmp_path / "r")), progress=False,
                data=load_dataset("synthetic", seed=0, synthetic_size=256))
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["n_validation"] == res["n_validation"] > 0
    assert "training-split images held out of training" in saved["selection"]
    assert (tmp_path / "r" / "model_best.pt").exists()


def test_keep_last_batch_trains_the_partial_batch():
    data = load_dataset("synthetic", seed=0, synthetic_size=256)
    drop, keep = Run(_cfg(eval_n=0), data=data), Run(_cfg(eval_n=0, keep_last_batch=True), data=data)
    n = int(data.train_x.shape[0])
    assert len(drop.loader) == n // 64 and len(keep.loader) == -(-n // 64)
    assert sum(len(b) for b in keep.loader) == n


def test_train_subset_is_seeded_and_class_mixed():
    data = load_dataset("digits", seed=0)
    a, b = Run(_cfg(dataset="digits", train_subset=300), data=data), Run(_cfg(dataset="digits", train_subset=300), data=data)
    assert a.train_x.shape[0] + a.val_x.shape[0] == 300 and torch.equal(a.train_x, b.train_x)
    assert len(set(a.train_y.tolist())) == 10


def test_device_auto_resolves_and_is_logged(capsys):
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    train(_cfg(device="auto", eval_n=0), progress=True, data=load_dataset("synthetic", seed=0, synthetic_size=128))
    assert f"clean on {want}" in capsys.readouterr().err
