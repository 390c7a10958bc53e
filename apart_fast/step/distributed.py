"""Data-parallel training through torch.distributed (``torchrun --nproc_per_node N -m apart_fast train``).

Design (why no DDP wrapper): every method's *update* backward is followed by one explicit
all-reduce of a flat buffer holding the model's gradients, the method's extra gradients (APART's
step sizes) and one "this rank saw a non-finite value" count. So

- APART's pass 1 (``torch.autograd.grad`` w.r.t. inputs) and every attack pass never touch a
  reducer: only the update pass is reduced, with no ``no_sync``/``find_unused_parameters`` subtleties;
- the step sizes' gradients are averaged with the model's, so they stay identical on every rank;
- the fault decision (keep or undo the step) is the same on every rank without a host sync;
- the step stays capturable in a CUDA graph (one NCCL all-reduce, no Python-side bookkeeping).

The price against DDP is no overlap of communication with the backward pass (one bucket at the
end); for the models here (<= 46M parameters) that is a few milliseconds per step on NVLink.

Data: every rank holds the whole (resident) dataset and draws the *same* seeded permutation, crops
and flips for every global batch of ``batch_size`` examples; rank r trains on slice r of each
global batch (``ShardLoader``). The loader's state is therefore independent of the number of
processes, and a checkpoint resumes on any number of them (1 included).

BatchNorm: per-rank batch statistics, as standard DDP. Running statistics are averaged across
ranks (``Comm.average_buffers``) before every evaluation and checkpoint, so all ranks evaluate
the same model and the checkpoint holds the mean (EMA is linear: the same as averaging every step,
up to rounding).

APART's omega store: *replicated*, not sharded. Every rank keeps the full store and applies the
update of every example of the global batch: the ranks all-gather the int8 sign of dL2/dx1
(B x C x H x W bytes: 0.4 MB per step for CIFAR at batch 128) and the (index, crop, flip) rows,
then each applies the same ``omega_update``. Why: with a global shuffle an example is seen by a
different rank every epoch, so a store sharded by index would need an all-to-all of omega windows
before pass 1 and back after pass 2 (two exchanges on the critical path); the replicated store
needs one small all-gather after the step and costs memory only: CIFAR-10's padded store is
50,000 x 3 x 40 x 40 x 4 bytes = 960 MB in fp32 per GPU (ImageNet-scale data would need sharding).
The store stays identical on every rank, so the checkpoint holds it once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from apart_fast.config import ConfigError
from apart_fast.data import DeviceLoader
from apart_fast.step.guard import finite_flag

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables; (0, 1, 0) without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun --nproc_per_node N")
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


class Comm:
    """The process group a run trains in; with ``world == 1`` every collective is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, owns_group: bool = False) -> None:
        self.rank, self.world = rank, world
        self.device = device if device is not None else torch.device("cpu")
        self.owns_group = owns_group  # this Comm initialised the default group, so it destroys it

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> tuple[Comm, str]:
        """The Comm for this process (initialising the default process group under torchrun) and
        the device name to train on (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
        rank, world, local = env_world()
        if world == 1:
            return cls(), device_name
        if device_name == "cuda":
            device_name = f"cuda:{local}"
        dev = torch.device(device_name)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
            owns = True
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ConfigError(f"the process group has rank {dist.get_rank()}/{dist.get_world_size()}, "
                              f"the environment says {rank}/{world}; launch with torchrun")
        return cls(rank, world, dev, owns), device_name

    def close(self) -> None:
        """Destroy the process group if this Comm created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # -- collectives used by every step (no host sync) ------------------------------------------

    def reduce_grads_and_flag(self, loss: Tensor, grads: Sequence[Tensor], local: Sequence[Tensor | None] = (),
                              loss_flag: bool = True) -> tuple[Tensor, Tensor | None]:
        """Average ``grads`` across ranks in place; return (keep flag, loss finite on every rank), both
        0-dim bool tensors with the same value on every rank.

        The keep flag is True where the loss, the averaged gradients and the rank-local tensors
        ``local`` (e.g. dL2/dx1) are finite on every rank. One process: ``finite_flag(loss, grads + local)``,
        and the loss flag only with ``loss_flag`` (None otherwise: it costs a few kernels per step).
        """
        grads = list(grads)
        if not self.distributed:
            return finite_flag(loss, [*grads, *local]), torch.isfinite(loss.detach()) if loss_flag else None
        loss_bad = ~torch.isfinite(loss.detach())
        local_bad = ~finite_flag(loss, local)
        counts = torch.stack([local_bad, loss_bad]).float().to(loss.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [counts])
        dist.all_reduce(flat)
        counts = flat[-2:]
        flat = flat[:-2].div_(self.world)
        out = torch.split(flat, [g.numel() for g in grads])
        torch._foreach_copy_(grads, [o.view_as(g).to(g.dtype) for o, g in zip(out, grads)])
        zero = torch.zeros((), device=loss.device)
        return finite_flag(zero, grads) & (counts[0] == 0), counts[1] == 0

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` concatenated along dim 0 in rank order (``t`` itself in one process)."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    # -- set-up, evaluation and checkpoints --------------------------------------------------------

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Rank 0's values of ``tensors`` on every rank (the initial weights, step sizes and store)."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    @torch.no_grad()
    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) across ranks."""
        if not self.distributed:
            return
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(self.world)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.distributed:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a stop signal seen by one process)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)


LOCAL = Comm()


class ShardLoader(DeviceLoader):
    """A ``DeviceLoader`` over global batches of ``batch_size`` examples whose rank ``rank`` slice this
    process trains on. Every rank draws the same permutation, crops and flips, so the state (and a
    checkpoint of it) does not depend on the number of processes."""

    def __init__(self, *args: Any, rank: int = 0, world: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.batch_size % world:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by the {world} processes; "
                              f"pass a multiple of {world}")
        if self.ragged != "drop":
            raise ConfigError(f"ShardLoader got ragged={self.ragged!r}; pass ragged='drop' (every rank trains on an equal slice)")
        self.rank, self.world = rank, world
        self.local_batch = self.batch_size // world

    def _slices(self, n: int) -> Iterator[slice]:
        """This rank's part of every global batch."""
        for sl in super()._slices(n):
            lo = sl.start + self.rank * self.local_batch
            yield slice(lo, lo + self.local_batch)
