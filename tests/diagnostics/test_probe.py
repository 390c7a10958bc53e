"""The epoch probe: finite values in sane ranges, and no effect at all on training."""

from __future__ import annotations

import pytest
import torch

from apart_fast.config import ApartConfig, Config
from apart_fast.data import load_dataset
from apart_fast.diagnostics import epoch_probe, probe_batch
from apart_fast.engine.loop import Run, train


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0, synthetic_size=96)


def config(method: str, **kw) -> Config:
    apart = ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e-3)
    return Config(method=method, dataset="synthetic", model="smallcnn", width=4, epochs=2, batch_size=32,
                  pgd_steps=3, free_replays=2, eval_n=32, eval_steps=2, final_eval_steps=0, apart=apart, **kw)


def state(run: Run) -> list[torch.Tensor]:
    """Everything training evolves: weights, BN buffers, optimizer state, method state."""
    out = [t.detach().clone() for t in run.model.state_dict().values()]
    for s in run.optimizer.state.values():
        out += [v.clone() for v in s.values() if isinstance(v, torch.Tensor)]
    for v in run.method.state_dict().values():
        if isinstance(v, torch.Tensor):
            out.append(v.clone())
        elif isinstance(v, list):
            out += [t.clone() for t in v if isinstance(t, torch.Tensor)]
    out.append(torch.get_rng_state())
    return out


@pytest.mark.parametrize("method", ["clean", "fgsm", "fgsm_rs", "free", "pgd", "apart"])
def test_probe_leaves_training_bit_identical(method, data):
    runs = []
    for probe in (False, True):
        run = Run(config(method), data)
        for _ in range(2):
            run.train_epoch(progress=False)
            if probe:
                epoch_probe(run)
        runs.append(state(run))
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["clean", "fgsm_rs", "free", "apart"])
def test_probe_values_finite_and_in_range(method, data):
    run = Run(config(method), data)
    run.train_epoch(progress=False)
    vals = epoch_probe(run)
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in vals.values())
    assert -1.0 <= vals["probe_cosine"] <= 1.0
    assert 0.0 <= vals["probe_flip_frac"] <= 1.0 and 0.0 <= vals["probe_pgd_flip_frac"] <= 1.0
    assert vals["probe_pgd_gain"] > 0
    assert vals["probe_linf"] <= run.cfg.eps + 1e-6
    if method == "clean":
        assert vals["probe_method_gain"] == 0.0 and vals["probe_strength_ratio"] == 0.0
    if method == "fgsm_rs":  # a real attack: clearly stronger than nothing, about as strong as PGD at most
        assert 0.0 < vals["probe_strength_ratio"] < 1.5 and vals["probe_cosine"] > 0


def test_probe_batch_is_fixed_unaugmented_and_cached(data):
    run = Run(config("fgsm"), data)
    b = probe_batch(run)
    assert b is probe_batch(run)
    assert len(b) == 32 and not b.flip.any() and (b.crop == run.method.info.pad).all()
    assert torch.equal(b.x, run.data.train_x[b.index].float() / 255)  # the images trained on (store rows)
    assert len(set(b.y.tolist())) > 1  # not one class


def test_train_with_and_without_probe_identical_and_logged(data, tmp_path, monkeypatch):
    res = train(config("apart", out=str(tmp_path / "on")), progress=False, data=data)
    assert "probe_strength_ratio" in res["history"][-1] and "a_in" in res["history"][-1]
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    off = train(config("apart", out=str(tmp_path / "off")), progress=False, data=data)
    assert "probe_strength_ratio" not in off["history"][-1]
    for a, b in zip(res["model"].state_dict().values(), off["model"].state_dict().values()):
        assert torch.equal(a, b)
    cfg = config("apart")
    cfg.probe = False
    assert "probe_cosine" not in train(cfg, progress=False, data=data)["history"][-1]
