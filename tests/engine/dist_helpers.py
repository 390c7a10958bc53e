"""Helpers for the distributed tests: a BatchNorm-free residual model with one PerturbSite, a free
port, and a worker that trains as one rank of a gloo group (a module, so spawned children import it)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast.models import PerturbSite


class TinyRes(nn.Module):
    """A user's model: stem conv, one residual block whose first conv reads a PerturbSite, linear head.

    No BatchNorm, so every example's forward pass is independent of the rest of the batch and a
    data-parallel run computes what one process computes on the global batch (up to rounding).
    """

    def __init__(self, channels: int = 3, width: int = 4, num_classes: int = 10, hooked: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.site = nn.Identity() if hooked else PerturbSite()  # hooked: no marker, APART attaches a site to conv1
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.stem(x))
        out = self.conv2(F.relu(self.conv1(self.site(a)))) + a  # shortcut takes the unperturbed input
        return self.head(F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's environment for one rank on this machine."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], dump: str, user_model: bool | str) -> None:
    """Train as rank ``rank`` of ``world``; dump this rank's final weights, step sizes and store to ``dump``."""
    os.environ.update(rank_env(rank, world, port))
    os.environ["APART_FAST_PROBE"] = "0"
    torch.set_num_threads(1)
    from apart_fast.config import Config
    from apart_fast.engine import loop

    seen: dict[str, Any] = {}
    orig = loop.Run.state_dict

    def state_dict(run: loop.Run) -> dict:  # keep every rank's own state, not only rank 0's file
        state = orig(run)
        seen["model"] = {k: v.clone() for k, v in run.model.state_dict().items()}
        seen["method"] = run.method.state_dict()
        return state

    loop.Run.state_dict = state_dict  # type: ignore[method-assign]
    cfg = Config.from_dict(cfg_dict)
    torch.manual_seed(0)
    res = loop.train(cfg, progress=False, model=TinyRes(hooked=user_model == "hooked") if user_model else None)
    seen["history"] = res["history"]
    torch.save(seen, Path(dump) / f"rank{rank}.pt")


def spawn(world: int, cfg_dict: dict[str, Any], dump: Path, user_model: bool | str = True) -> list[dict[str, Any]]:
    """Run ``worker`` in ``world`` fresh processes (one gloo group) and return each rank's dump; ``user_model``:
    TinyRes (True), TinyRes without its marker ("hooked"), or the config's model (False)."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), cfg_dict, str(dump), user_model), nprocs=world, join=True)
    return [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in range(world)]
