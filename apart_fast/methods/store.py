"""APART's per-example store of omega: its size, a compact form, and whether it fits.

The store holds each training example's initialisation ``omega`` in the padded frame, ``N x C x (H+2p) x
(W+2p)`` values: 4 bytes each in float32 (915 MiB for CIFAR-10's 50,000 32x32 images with pad 4; about
0.8 TB for ImageNet at 224 px). The update clamps omega to [-1, 1], so a compact store loses little:

- ``float16`` (2 bytes): the same fused ops on every backend (torch, cpp, triton, cuda) in the store's
  dtype; omega is cast to the batch's dtype after the gather. Each update rounds to fp16 (a relative
  2^-11, and a 0-d ratio is rounded to fp16 first, as in any fp16 store).
- ``int8`` (1 byte): omega = q / 127 with q in [-127, 127], rounded to nearest after every update (an
  absolute error of at most 1/254 per update; the N(0, 0.001^2) start rounds to 0). Gather and update
  run as PyTorch indexing ops on any device (the torch reference path, not the fused kernels), with the
  same window rules (crop, flip, an example's first occurrence wins).

A compact store's update takes only the sign of dL/dx1 (``pack_sign``'s int8 tensor, converted to the
store's dtype), so no gradient underflows in a 16-bit store. ``check_fits`` refuses, with one line naming the options, a
store larger than the memory free on its device.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from apart_fast import ops
from apart_fast.config import ConfigError
from apart_fast.ops import reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
INT8_SCALE = 127.0  # int8 omega = q / 127: +-1 exactly representable


def store_shape(n: int, channels: int, height: int, width: int, pad: int) -> tuple[int, int, int, int]:
    """The store's shape: one padded frame per training example."""
    return n, channels, height + 2 * pad, width + 2 * pad


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a store of ``shape`` in ``dtype`` (a name of ``DTYPES``)."""
    n = 1
    for s in shape:
        n *= s
    return n * DTYPES[dtype].itemsize


def mib(b: int) -> str:
    """Bytes in words: KiB below a MiB, MiB below a GiB, GiB above."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b / 2**10:.1f} KiB"


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a new tensor on ``device``: CUDA's free memory, the CPU's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(shape: tuple[int, ...], dtype: str, device: torch.device) -> None:
    """ConfigError (one line, naming the options) when the store, and its float32 draw made on the CPU first,
    exceed the memory free on their devices."""
    need = {device.type: nbytes(shape, dtype)}
    need["cpu"] = need.get("cpu", 0) + nbytes(shape, "float32")  # drawn in float32 on the CPU, then converted
    for kind, b in need.items():
        free = free_memory(device if kind == device.type else torch.device("cpu"))
        if free is not None and b > free:
            n, rest = shape[0], " x ".join(str(s) for s in shape[1:])
            options = ", ".join(f"--apart-store-dtype {k} ({mib(nbytes(shape, k))})" for k in DTYPES if k != dtype)
            raise ConfigError(f"APART's per-example store ({n} examples x {rest} {dtype}) needs {mib(b)} on {kind} but "
                              f"{mib(free)} is free; use {options}, a smaller --train-subset, or --no-apart-store "
                              "(fresh noise each step)")


def new_store(shape: tuple[int, int, int, int], dtype: str, std: float, seed: int, channels_last: bool,
              device: torch.device) -> Tensor:
    """N(0, std^2) omega in ``dtype`` (int8: quantised), drawn on the CPU with a seeded generator: a float32 store
    is the one earlier versions drew, and a compact one is that store rounded."""
    check_fits(shape, dtype, device)
    gen = torch.Generator().manual_seed(seed)
    store = torch.randn(shape, generator=gen).mul_(std)  # in place: one copy on the CPU
    if dtype == "int8":
        store = quantize(store)
    elif dtype != "float32":
        store = store.to(DTYPES[dtype])
    if channels_last:  # the batches' format, so omega_gather's windows need no conversion in the step
        store = store.contiguous(memory_format=torch.channels_last)
    return store.to(device)


def quantize(omega: Tensor) -> Tensor:
    """omega in [-1, 1] as int8 q = round(127 omega)."""
    return (omega.clamp(-1.0, 1.0) * INT8_SCALE).round_().to(torch.int8)


def gather(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, like: Tensor, backend: str) -> Tensor:
    """Each example's omega window (``ops.omega_gather``) in ``like``'s dtype."""
    size = like.shape[-2:]
    if store.dtype == torch.int8:
        return reference.omega_gather(store, index, crop, flip, size).to(like.dtype) / INT8_SCALE
    return ops.omega_gather(store, index, crop, flip, size, backend=backend).to(like.dtype)


def update(store: Tensor, index: Tensor, crop: Tensor, flip: Tensor, g: Tensor, ratio: Tensor, backend: str) -> None:
    """In place ``omega <- clamp(omega + ratio * sign(g), -1, 1)`` through each window (``ops.omega_update``).
    ``g``: dL/dx1 in the store's dtype (passed as it is), or any other float or int8 sign tensor (its sign is
    converted to the store's dtype)."""
    if g.dtype == store.dtype and store.is_floating_point():
        ops.omega_update(store, index, crop, flip, g, ratio, backend=backend)
        return
    sign = g if g.dtype == torch.int8 else ops.pack_sign(g, backend=backend)
    if store.dtype != torch.int8:
        ops.omega_update(store, index, crop, flip, sign.to(store.dtype), ratio, backend=backend)
        return
    size = sign.shape[-2:]
    with torch.no_grad():
        omega = reference.omega_gather(store, index, crop, flip, size).float() / INT8_SCALE
        new = quantize(omega + ratio.float() * sign.float())
        src = reference.first_position(index)  # an example twice in the batch: its first occurrence wins
        store[reference._window(store, index[src], crop[src], flip[src], size)] = new[src]


__all__ = ["DTYPES", "check_fits", "free_memory", "gather", "mib", "nbytes", "new_store", "store_shape", "update"]
