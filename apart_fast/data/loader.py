"""Device-resident batching with batched random crop + horizontal flip and exact augmentation records."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import DataError

PAD_MODES = ("constant", "reflect")
RAGGED_MODES = ("keep", "drop", "pad")


@dataclass
class Batch:
    """One training batch plus the augmentation applied to each example.

    The augmented image is ``padded[:, dy:dy+H, dx:dx+W]`` (padded by ``pad`` on all sides), then
    reversed along the last dim where ``flip``; ``valid`` is False for fillers of a padded last batch.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    crop: torch.Tensor
    flip: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        """Batch size B (fillers included)."""
        return int(self.x.shape[0])


def augment_batch(
    x: torch.Tensor,
    crop: torch.Tensor,
    flip: torch.Tensor,
    pad: int,
    pad_mode: str = "constant",
    pad_value: float = 0.5,
    channels_last: bool = False,
) -> torch.Tensor:
    """Apply per-example crop windows (dy, dx) of the padded frame and flips to a float batch (B,C,H,W).

    Done with one F.pad and one advanced-indexing gather, so it runs on any device without Python loops;
    ``channels_last``: the gather writes (B,H,W,C) order, so the result is channels_last with no extra copy.
    """
    b, c, h, w = x.shape
    dev = x.device
    crop = crop.to(dev)
    flip = flip.to(dev)
    if pad > 0:
        frame = (
            F.pad(x, (pad, pad, pad, pad), mode=pad_mode, value=pad_value)
            if pad_mode == "constant"
            else F.pad(x, (pad, pad, pad, pad), mode=pad_mode)
        )
    else:
        frame = x
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = crop[:, 0:1] + ar_h[None, :]  # (B,H)
    cols = torch.where(flip[:, None], crop[:, 1:2] + (w - 1 - ar_w)[None, :], crop[:, 1:2] + ar_w[None, :])  # (B,W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    if channels_last:  # index (B,H,W,C) and view it back as (B,C,H,W): channels_last strides
        ci = torch.arange(c, device=dev)[None, None, None, :]
        return frame[bi, ci, rows[:, :, None, None], cols[:, None, :, None]].permute(0, 3, 1, 2)
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return frame[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


_DECODE: dict[torch.device, torch.Tensor] = {}  # per device: float32 i/255 for every byte i


def decode_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0,1] through a 256-entry table of ``i/255`` (fp32 division on the CPU),
    so every device decodes bit for bit alike: CUDA's ``div_(255)`` multiplies by the fp32 reciprocal,
    one ulp off the CPU for about half of the byte values."""
    lut = _DECODE.get(x.device)
    if lut is None:
        lut = _DECODE[x.device] = (torch.arange(256, dtype=torch.float32) / 255).to(x.device)
    return lut.index_select(0, x.reshape(-1).to(torch.int32)).view(x.shape)


class DeviceLoader:
    """Batches a uint8 dataset kept whole on ``device``; each iteration is one epoch.

    Permutation, crop offsets and flips come only from the loader's own seeded CPU generator, so runs
    are reproducible and ``state_dict`` / ``load_state_dict`` resume the exact next epoch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        augment: bool = True,
        crop: bool = True,
        pad: int = 4,
        pad_mode: str = "constant",
        pad_value: float = 0.5,
        flip: bool = True,
        ragged: str = "keep",
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise DataError(
                f"loader x has dtype {x.dtype} and shape {tuple(x.shape)}; pass uint8 images shaped (N,C,H,W)"
            )
        n = int(x.shape[0])
        if y.dim() != 1 or int(y.shape[0]) != n:
            raise DataError(f"loader y has shape {tuple(y.shape)} but x has {n} examples; pass one label per image")
        if n == 0:
            raise DataError("loader got an empty dataset; pass at least one example")
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} is not positive; pass batch_size >= 1")
        if pad_mode not in PAD_MODES:
            raise DataError(f"pad_mode {pad_mode!r} is unknown; choose one of {', '.join(PAD_MODES)}")
        if ragged not in RAGGED_MODES:
            raise DataError(f"ragged {ragged!r} is unknown; choose one of {', '.join(RAGGED_MODES)}")
        if pad < 0:
            raise DataError(f"pad {pad} is negative; pass pad >= 0")
        h, w = int(x.shape[2]), int(x.shape[3])
        if pad_mode == "reflect" and pad >= min(h, w):
            raise DataError(f"pad {pad} is too large for reflect padding of {h}x{w} images; use pad < {min(h, w)}")
        if ragged == "drop" and batch_size > n:
            raise DataError(
                f"batch_size {batch_size} exceeds the {n} examples with ragged='drop'; lower it or use 'keep'"
            )
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.n = n
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.random_crop = bool(augment and crop and pad > 0)
        self.random_flip = bool(augment and flip)
        self.pad = int(pad)
        self.pad_mode = pad_mode
        self.pad_value = float(pad_value)
        self.ragged = ragged
        self.seed = seed
        self.channels_last = bool(channels_last)  # batches in the model's memory format (no conversion in the step)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.ragged == "drop":
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Generator state and epoch count; loading it makes the next epoch identical to the saved run's."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` so the following ``__iter__`` draws exactly the saved next epoch."""
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])

    def _draw_epoch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw the epoch's order (extended with fillers for ragged='pad'), crops, flips and valid mask on CPU."""
        gen = self.generator
        perm = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        total = len(self) * self.batch_size if self.ragged != "keep" else self.n
        if self.ragged == "drop":
            order = perm[:total]
        elif total > self.n:  # ragged == "pad": repeat from the start of the permutation
            order = perm.repeat(-(-total // self.n))[:total]
        else:
            order = perm
        valid = torch.arange(len(order)) < self.n
        m = len(order)
        if self.random_crop:
            crop = torch.randint(0, 2 * self.pad + 1, (m, 2), generator=gen)
        else:
            crop = torch.full((m, 2), self.pad, dtype=torch.int64)
        if self.random_flip:
            flip = torch.rand(m, generator=gen) < 0.5
        else:
            flip = torch.zeros(m, dtype=torch.bool)
        return order, crop, flip, valid

    def _slices(self, n: int) -> Iterator[slice]:
        """Positions of the epoch's batches in the drawn order (a sharded loader narrows each to its rank's part)."""
        for start in range(0, n, self.batch_size):
            yield slice(start, start + self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """One epoch of augmented float batches in [0,1] on the loader's device."""
        order, crop, flip, valid = (t.to(self.device) for t in self._draw_epoch())
        self.epoch += 1
        for sl in self._slices(len(order)):
            idx = order[sl]
            xb = decode_uint8(self.x[idx])
            cb, fb = crop[sl], flip[sl]
            cl = self.channels_last
            if self.random_crop:
                xb = augment_batch(xb, cb, fb, self.pad, self.pad_mode, self.pad_value, channels_last=cl)
            elif self.random_flip:  # centre crop of the padded frame is the image itself: skip the padding
                xb = augment_batch(xb, torch.zeros_like(cb), fb, 0, channels_last=cl)
            elif cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield Batch(x=xb, y=self.y[idx], index=idx, crop=cb, flip=fb, valid=valid[sl])


def iter_eval(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield un-augmented (float32 x in [0,1], int64 y) batches in dataset order, moved to ``device``."""
    if batch_size < 1:
        raise DataError(f"batch_size {batch_size} is not positive; pass batch_size >= 1")
    dev = torch.device(device)
    for start in range(0, int(x.shape[0]), batch_size):
        xb = x[start : start + batch_size].to(dev)
        xb = decode_uint8(xb) if xb.dtype == torch.uint8 else xb.to(torch.float32)
        yield xb, y[start : start + batch_size].to(dev, torch.int64)
