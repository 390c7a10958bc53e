"""Tiny synthetic batches and models for method tests."""

from __future__ import annotations

import pytest
import torch

from apart_fast.config import ApartConfig, Config
from apart_fast.data import DeviceLoader
from apart_fast.methods import DataInfo, build_method
from apart_fast.models import build_model
from apart_fast.step.schedule import CyclicSchedule

N, C, H, W, PAD = 24, 3, 8, 8, 2


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (N,), generator=g)
    return x, y


def make_method(name: str, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float32, **cfg_kw):
    """A method on a small CNN with its optimizer attached, plus a loader over (x, y)."""
    torch.manual_seed(0)
    apart = cfg_kw.pop("apart", ApartConfig(a_init=0.01, a_in=0.01, a_layer=0.01, lr=1e-3))
    cfg = Config(method=name, eps=8 / 255, batch_size=8, pgd_steps=3, free_replays=2, apart=apart, **cfg_kw)
    model = build_model("smallcnn", num_classes=10, in_channels=C, width=4).to(dtype)
    info = DataInfo(n_train=N, channels=C, height=H, width=W, pad=PAD)
    method = build_method(name, model, cfg, info, torch.device("cpu"))
    if dtype != torch.float32 and hasattr(method, "store"):
        method.store = method.store.to(dtype)
        for p in method.step_sizes():
            p.data = p.data.to(dtype)
    params = list(model.parameters()) + method.extra_model_params()
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = CyclicSchedule(opt, 100, 0.1, (0.9, 0.8))
    method.attach(opt, sched, 100)
    loader = DeviceLoader(x, y, 8, pad=PAD, ragged="drop", seed=0)
    return method, loader


@pytest.fixture
def make():
    """The ``make_method`` factory, as a fixture (test folders are not packages)."""
    return make_method
