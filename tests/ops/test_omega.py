"""omega_gather / omega_update against the reference, bit for bit, and against a per-pixel loop written here."""

from __future__ import annotations

import pytest
import torch
from ops_testutil import DTYPES, assert_exact, gen, randn

from apart_fast import ops
from apart_fast.ops import reference as R

N, C, HP, WP, H, W = 7, 3, 13, 15, 8, 10  # store frame 13x15, window 8x10: crops in 0..5 x 0..5


def _batch(seed: int, b: int, dup: bool):
    g = gen(seed)
    if dup:
        index = torch.randint(N, (b,), generator=g)
        index[-1] = index[0]  # at least one repeated example
    else:
        index = torch.randperm(N, generator=g)[:b]
    crop = torch.stack([torch.randint(HP - H + 1, (b,), generator=g), torch.randint(WP - W + 1, (b,), generator=g)], 1)
    flip = torch.rand(b, generator=g) < 0.5
    return index, crop, flip


def _store(dtype, seed: int) -> torch.Tensor:
    return (torch.rand(N, C, HP, WP, generator=gen(seed), dtype=torch.float64) * 2 - 1).to(dtype)


def _window_loop(store, b_index, crop, flip):
    """The window of one example, by explicit slicing (independent of the reference's advanced indexing)."""
    dy, dx = int(crop[0]), int(crop[1])
    w = store[b_index, :, dy:dy + H, dx:dx + W]
    return w.flip(-1) if bool(flip) else w


@pytest.mark.parametrize("dup", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather(backend: str, dtype, dup: bool) -> None:
    store = _store(dtype, 1)
    index, crop, flip = _batch(2, 5, dup)
    out = ops.omega_gather(store, index, crop, flip, (H, W), backend=backend)
    assert_exact(out, R.omega_gather(store, index, crop, flip, (H, W)), "gather")
    for b in range(5):
        assert_exact(out[b], _window_loop(store, index[b], crop[b], flip[b]), f"example {b}")


@pytest.mark.parametrize("value", [0.375, 0.1])  # 0.1 is inexact in fp16/bf16: 0-d and float round it, (1,) does not
@pytest.mark.parametrize("ratio_kind", ["float", "0d", "1elem"])
@pytest.mark.parametrize("dup", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update(backend: str, dtype, dup: bool, ratio_kind: str, value: float) -> None:
    store = _store(dtype, 3)
    index, crop, flip = _batch(4, 6, dup)
    g = randn((6, C, H, W), dtype, 5)
    ratio = {"float": value, "0d": torch.tensor(value), "1elem": torch.tensor([value])}[ratio_kind]
    before = store.clone()
    old = R.omega_gather(before, index, crop, flip, (H, W))
    ours, ref = store.clone(), store.clone()
    assert ops.omega_update(ours, index, crop, flip, g, ratio, backend=backend) is None
    R.omega_update(ref, index, crop, flip, g, ratio)
    assert_exact(ours, ref, "store")
    # Write-back on the right pixels of the right examples: first occurrences only, the rest untouched.
    expect = before.clone()
    seen: set[int] = set()
    for b in range(6):
        i = int(index[b])
        if i in seen:
            continue
        seen.add(i)
        new = torch.clamp(old[b] + ratio * torch.sign(g[b]).to(dtype), -1, 1).to(dtype)
        dy, dx = int(crop[b, 0]), int(crop[b, 1])
        expect[i, :, dy:dy + H, dx:dx + W] = new.flip(-1) if bool(flip[b]) else new
    assert_exact(ours, expect, "store vs per-pixel loop")
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[index] = False
    assert_exact(ours[untouched], before[untouched], "examples outside the batch")
    # Round trip: gathering after the update gives the updated values of the first occurrences.
    again = ops.omega_gather(ours, index, crop, flip, (H, W), backend=backend)
    first = R.first_position(index)
    for b in range(6):
        if int(first[b]) == b:
            assert_exact(again[b], torch.clamp(old[b] + ratio * torch.sign(g[b]).to(dtype), -1, 1).to(dtype),
                         f"example {b}")


def test_update_deterministic_with_duplicates(backend: str) -> None:
    """Every duplicate of an example carries a different g and crop; the first occurrence wins, every run."""
    store = _store(torch.float32, 6)
    index = torch.tensor([2, 2, 2, 5])
    crop = torch.tensor([[0, 0], [5, 5], [1, 2], [3, 3]])
    flip = torch.tensor([False, True, True, False])
    g = randn((4, C, H, W), torch.float32, 7)
    runs = []
    for _ in range(3):
        s = store.clone()
        ops.omega_update(s, index, crop, flip, g, 0.5, backend=backend)
        runs.append(s)
    ref = store.clone()
    R.omega_update(ref, index, crop, flip, g, 0.5)
    for s in runs:
        assert_exact(s, ref, "store")
    only_first = store.clone()
    R.omega_update(only_first, index[[0, 3]], crop[[0, 3]], flip[[0, 3]], g[[0, 3]], 0.5)
    assert_exact(runs[0], only_first, "first occurrence wins")


def test_index_dtypes(backend: str) -> None:
    """int32 index/crop and uint8 flip are accepted (converted on the device)."""
    store = _store(torch.float32, 8)
    index, crop, flip = _batch(9, 4, False)
    out = ops.omega_gather(store, index.int(), crop.int(), flip.to(torch.uint8), (H, W), backend=backend)
    assert_exact(out, R.omega_gather(store, index, crop, flip, (H, W)), "gather")


def test_omega_errors(backend: str) -> None:
    store = _store(torch.float32, 10)
    index, crop, flip = _batch(11, 4, False)
    with pytest.raises(ValueError, match="crop"):
        ops.omega_gather(store, index, crop[:3], flip, (H, W), backend=backend)
    with pytest.raises(ValueError, match="batch"):
        ops.omega_update(store, index, crop, flip, torch.zeros(3, C, H, W), 0.5, backend=backend)
    with pytest.raises(TypeError, match="g.to"):
        ops.omega_update(store, index, crop, flip, torch.zeros(4, C, H, W, dtype=torch.float64), 0.5, backend=backend)
