"""DeviceLoader: exact crop/flip contract, epoch coverage, ragged modes, resume and RNG isolation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from apart_fast.data import Batch, DataError, DeviceLoader, decode_uint8, iter_eval, load_dataset


def _data(n: int = 37, c: int = 3, h: int = 6, w: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _reference(img_u8: torch.Tensor, dy: int, dx: int, flip: bool, pad: int, mode: str, value: float) -> torch.Tensor:
    """Slow per-example augmentation: pad by `pad`, slice the window at (dy, dx), flip the last dim."""
    img = img_u8.float() / 255
    _, h, w = img.shape
    if mode == "constant":
        padded = F.pad(img[None], (pad, pad, pad, pad), mode="constant", value=value)[0]
    else:
        padded = F.pad(img[None], (pad, pad, pad, pad), mode="reflect")[0]
    assert padded.shape[1:] == (h + 2 * pad, w + 2 * pad)
    out = padded[:, dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


def _epoch(loader: DeviceLoader) -> list[Batch]:
    return list(loader)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_flip_contract_matches_reference(mode: str) -> None:
    x, y = _data()
    pad = 2
    loader = DeviceLoader(x, y, 8, pad=pad, pad_mode=mode, pad_value=0.5, seed=3)
    seen_flip = set()
    seen_crop = set()
    for batch in loader:
        assert batch.x.dtype == torch.float32 and batch.x.shape[1:] == x.shape[1:]
        assert batch.crop.dtype == torch.int64 and batch.crop.shape == (len(batch), 2)
        assert batch.flip.dtype == torch.bool and batch.valid.all()
        assert int(batch.crop.min()) >= 0 and int(batch.crop.max()) <= 2 * pad
        assert torch.equal(batch.y, y[batch.index])
        for i in range(len(batch)):
            dy, dx = (int(v) for v in batch.crop[i])
            ref = _reference(x[int(batch.index[i])], dy, dx, bool(batch.flip[i]), pad, mode, 0.5)
            assert torch.equal(batch.x[i], ref), (i, dy, dx)
            seen_flip.add(bool(batch.flip[i]))
            seen_crop.add((dy, dx))
    assert seen_flip == {True, False} and len(seen_crop) > 5


def test_constant_pad_uses_pad_value() -> None:
    x = torch.full((4, 1, 3, 3), 255, dtype=torch.uint8)
    loader = DeviceLoader(x, torch.zeros(4, dtype=torch.int64), 4, pad=3, pad_value=0.25, seed=0)
    batch = next(iter(loader))
    assert set(torch.unique(batch.x).tolist()) <= {0.25, 1.0}


def test_no_augment_and_no_flip() -> None:
    x, y = _data(n=20)
    plain = DeviceLoader(x, y, 6, augment=False, shuffle=False, pad=4)
    batches = _epoch(plain)
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(20))
    for b in batches:
        assert (b.crop == 4).all() and not b.flip.any()
        assert torch.equal(b.x, x[b.index].float() / 255)
    noflip = DeviceLoader(x, y, 6, flip=False, pad=2, seed=1)
    crops = []
    for b in noflip:
        assert not b.flip.any()
        crops.append(b.crop)
    assert len(torch.unique(torch.cat(crops), dim=0)) > 1
    nocrop = DeviceLoader(x, y, 6, crop=False, pad=2, seed=1)
    for b in nocrop:
        assert (b.crop == 2).all()
        for i in range(len(b)):
            ref = _reference(x[int(b.index[i])], 2, 2, bool(b.flip[i]), 2, "constant", 0.5)
            assert torch.equal(b.x[i], ref)


def test_keep_covers_each_example_once_per_epoch() -> None:
    x, y = _data(n=37)
    loader = DeviceLoader(x, y, 8, ragged="keep", seed=0)
    assert len(loader) == 5
    orders = []
    for _ in range(2):
        batches = _epoch(loader)
        assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
        idx = torch.cat([b.index for b in batches])
        assert torch.equal(idx.sort().values, torch.arange(37))
        orders.append(idx)
    assert not torch.equal(orders[0], orders[1])  # a fresh permutation each epoch
    assert loader.epoch == 2


def test_drop_ragged() -> None:
    x, y = _data(n=37)
    loader = DeviceLoader(x, y, 8, ragged="drop")
    batches = _epoch(loader)
    assert len(loader) == 4 == len(batches) and all(len(b) == 8 for b in batches)
    idx = torch.cat([b.index for b in batches])
    assert len(idx.unique()) == 32
    with pytest.raises(DataError, match="batch_size 50 exceeds the 37 examples"):
        DeviceLoader(x, y, 50, ragged="drop")


def test_pad_ragged_fills_from_start_of_permutation() -> None:
    x, y = _data(n=37)
    loader = DeviceLoader(x, y, 8, ragged="pad", seed=2)
    batches = _epoch(loader)
    assert len(loader) == 5 == len(batches) and all(len(b) == 8 for b in batches)
    idx = torch.cat([b.index for b in batches])
    valid = torch.cat([b.valid for b in batches])
    assert valid.sum() == 37 and not valid[37:].any() and valid[:37].all()
    assert torch.equal(idx[:37].sort().values, torch.arange(37))
    assert torch.equal(idx[37:], idx[:3])
    # batch bigger than the dataset: fillers cycle through the permutation
    small = DeviceLoader(x[:3], y[:3], 8, ragged="pad", seed=0)
    (b,) = _epoch(small)
    assert b.valid.tolist() == [True] * 3 + [False] * 5
    assert torch.equal(b.index[3:6], b.index[:3]) and torch.equal(b.index[6:], b.index[:2])


def test_resume_from_state_dict_reproduces_next_epoch() -> None:
    x, y = _data(n=30)
    a = DeviceLoader(x, y, 7, seed=11, pad_mode="reflect", pad=2)
    _epoch(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    expected = _epoch(a)
    b = DeviceLoader(x, y, 7, seed=999, pad_mode="reflect", pad=2)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.epoch == 1
    got = _epoch(b)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        for field in ("x", "y", "index", "crop", "flip", "valid"):
            assert torch.equal(getattr(e, field), getattr(g, field)), field


def test_seed_changes_draws_and_same_seed_repeats() -> None:
    x, y = _data(n=30)
    first = [torch.cat([b.index for b in DeviceLoader(x, y, 7, seed=s)]) for s in (1, 1, 2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_loader_does_not_touch_global_rng() -> None:
    x, y = _data(n=30)
    torch.manual_seed(123)
    want = torch.rand(5)
    torch.manual_seed(123)
    loader = DeviceLoader(x, y, 7, seed=5)
    for _ in range(2):
        _epoch(loader)
    loader.load_state_dict(loader.state_dict())
    assert torch.equal(torch.rand(5), want)


def test_bad_arguments_raise_data_error() -> None:
    x, y = _data(n=10)
    with pytest.raises(DataError, match="pad_mode 'edge'"):
        DeviceLoader(x, y, 4, pad_mode="edge")
    with pytest.raises(DataError, match="ragged 'x'"):
        DeviceLoader(x, y, 4, ragged="x")
    with pytest.raises(DataError, match="uint8"):
        DeviceLoader(x.float(), y, 4)
    with pytest.raises(DataError, match="pad 6 is too large for reflect"):
        DeviceLoader(x, y, 4, pad=6, pad_mode="reflect")


def test_iter_eval_batches_in_order() -> None:
    x, y = _data(n=10)
    out = list(iter_eval(x, y, 4))
    assert [len(b[0]) for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in out]), x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in out]), y)


def test_decode_is_the_cpu_division_for_every_byte() -> None:
    """The 256-entry table holds fp32 ``i/255`` as the CPU divides; the loader and iter_eval decode through it."""
    every = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    got = decode_uint8(every)
    assert got.dtype == torch.float32 and got.shape == every.shape
    assert torch.equal(got, every.float() / 255)
    assert torch.equal(got.flatten()[[0, 255]], torch.tensor([0.0, 1.0]))
    y = torch.zeros(4, dtype=torch.int64)
    (batch,) = DeviceLoader(every, y, 4, shuffle=False, augment=False)
    assert torch.equal(batch.x, got)
    assert torch.equal(next(iter_eval(every, y, 4))[0], got)


def test_small_cnn_learns_synthetic() -> None:
    """The synthetic smoke-test data is learnable through the loader in a few epochs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: avoid thread oversubscription on shared CI cores
    try:
        d = load_dataset("synthetic", seed=0, synthetic_size=256)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 10),
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loader = DeviceLoader(d.train_x, d.train_y, 32, pad=d.pad, flip=d.flip, seed=0)
        for _ in range(4):
            for batch in loader:
                loss = F.cross_entropy(model(batch.x), batch.y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in iter_eval(d.test_x, d.test_y, 256))
    finally:
        torch.set_num_threads(threads)
    assert correct / len(d.test_y) > 0.5  # chance is 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_is_bit_identical_to_cpu() -> None:
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(decode_uint8(every.cuda()).cpu(), decode_uint8(every))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_cuda_loader_matches_cpu_reference(mode: str) -> None:
    x, y = _data(n=300, h=32, w=32)
    loader = DeviceLoader(x, y, 64, device="cuda", pad=4, pad_mode=mode, ragged="pad", seed=7)
    assert loader.x.is_cuda
    for batch in loader:
        for field in ("x", "y", "index", "crop", "flip", "valid"):
            assert getattr(batch, field).is_cuda, field
        for i in range(0, len(batch), 7):
            dy, dx = (int(v) for v in batch.crop[i])
            ref = _reference(x[int(batch.index[i])], dy, dx, bool(batch.flip[i]), 4, mode, 0.5)
            assert torch.equal(batch.x[i].cpu(), ref)
    cpu = DeviceLoader(x, y, 64, pad=4, pad_mode=mode, ragged="pad", seed=7)
    gpu = DeviceLoader(x, y, 64, device="cuda", pad=4, pad_mode=mode, ragged="pad", seed=7)
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.x, b.x.cpu())
