"""AutoAttack on a CIFAR-10 (JPEG) subset model, at torchattacks' own settings, against a direct torchattacks call
(skips without the archive)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apart_fast.attacks import evaluate
from apart_fast.attacks.autoattack import evaluate_autoattack
from apart_fast.config import Config
from apart_fast.data import load_dataset

torchattacks = pytest.importorskip("torchattacks", reason="AutoAttack needs the [eval] extra (torchattacks)")
ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10-jpeg.tar.gz"
EPS = 8 / 255
N_TEST = 50  # AutoAttack is slow on 2 cores: a few minutes of CI


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 JPEG archive not found at {ARCHIVE}")
def test_cifar_subset_model_matches_a_direct_torchattacks_call(monkeypatch):
    from apart_fast.engine.loop import train

    monkeypatch.setenv("APART_FAST_PROBE", "0")
    data = load_dataset("cifar10", str(ARCHIVE))
    cfg = Config(method="fgsm_rs", dataset="cifar10", data_dir=str(ARCHIVE), model="smallcnn", width=16, epochs=4,
                 train_subset=4000, eval_n=0, final_eval_steps=0, device="cpu")
    model = train(cfg, progress=False, data=data)["model"].eval()
    idx = torch.randperm(int(data.test_x.shape[0]), generator=torch.Generator().manual_seed(1))[:N_TEST]
    x, y = data.test_x[idx].float() / 255, data.test_y[idx].long()
    pgd20 = evaluate(model, x, y, eps=EPS, step=EPS / 4, steps=20)["robust_acc"]
    assert pgd20 >= 0.1, pgd20  # some robust points: the comparison means something
    direct = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    with torch.no_grad():
        direct_acc = int((model(direct(x, y)).argmax(1) == y).sum()) / N_TEST
    same = evaluate_autoattack(model, x, y, EPS, steps=10, seed=0, batch_size=N_TEST)  # torchattacks' settings
    assert same["robust_acc"] == pytest.approx(direct_acc, abs=1e-12)
    # the standard version's 100 iterations against this call are checked on digits (test_autoattack.py): ten
    # times the work, and here one test's minutes are CI's critical path
