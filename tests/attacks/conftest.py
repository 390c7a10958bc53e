"""Small trained digits models shared by the AutoAttack and sanity-check tests (trained once per session)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from apart_fast.data import load_dataset
from apart_fast.experiments import demo_config

N_TEST = 120  # test points: AutoAttack is slow, CI runs this on 2 cores


def _train(method: str, epochs: int) -> nn.Module:
    from apart_fast.engine.loop import train

    data = load_dataset("digits", seed=0)
    cfg = demo_config(method, epochs, "cpu", 0)
    cfg.final_eval_steps, cfg.eval_n = 0, 0
    before = os.environ.get("APART_FAST_PROBE")
    os.environ["APART_FAST_PROBE"] = "0"
    try:
        return train(cfg, overwrite=True, progress=False, data=data)["model"].eval()
    finally:
        if before is None:
            os.environ.pop("APART_FAST_PROBE")
        else:
            os.environ["APART_FAST_PROBE"] = before


@pytest.fixture(scope="session")
def digits_points() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random slice of the digits test split as float images in [0, 1] and labels."""
    data = load_dataset("digits", seed=0)
    idx = torch.randperm(int(data.test_x.shape[0]), generator=torch.Generator().manual_seed(1))[:N_TEST]
    return data.test_x[idx].float() / 255, data.test_y[idx].long()


@pytest.fixture(scope="session")
def fgsm_rs_model() -> nn.Module:
    """FGSM-RS on digits as in the demo (15 epochs, about 3 s): robust at eps 0.1 without masking."""
    return _train("fgsm_rs", 15)


@pytest.fixture(scope="session")
def clean_model() -> nn.Module:
    """Clean training on digits, 10 epochs: accurate, not robust."""
    return _train("clean", 10)


@pytest.fixture(scope="session")
def apart_model() -> nn.Module:
    """APART on digits as in the demo (15 epochs, every APART setting at its default)."""
    return _train("apart", 15)
