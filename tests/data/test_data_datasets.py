"""Built-in datasets: digits and synthetic shapes, determinism, learnability; name/path errors."""

from __future__ import annotations

import pytest
import torch

from apart_fast.data import DataError, ImageData, load_dataset


def _check_common(d: ImageData) -> None:
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.is_contiguous() and x.device.type == "cpu"
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert int(y.min()) >= 0 and int(y.max()) < d.num_classes
    assert d.channels == d.train_x.shape[1]
    assert d.image_size == tuple(d.train_x.shape[2:])


def test_digits_shapes_and_range() -> None:
    d = load_dataset("digits")
    _check_common(d)
    assert d.name == "digits" and d.classes == [str(i) for i in range(10)] and d.num_classes == 10
    assert d.channels == 1 and d.image_size == (8, 8) and d.pad == 1 and d.flip is False
    assert len(d.train_x) + len(d.test_x) == 1797 and len(d.test_x) == 359
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    # values are the 17 levels round(v * 255 / 16)
    levels = {int(round(v * 255 / 16)) for v in range(17)}
    assert set(torch.unique(torch.cat([d.train_x, d.test_x])).tolist()) <= levels
    assert set(d.train_y.unique().tolist()) == set(range(10))


def test_digits_split_deterministic_per_seed() -> None:
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_deterministic_and_shapes() -> None:
    a = load_dataset("synthetic", seed=1, synthetic_size=200)
    b = load_dataset("synthetic", seed=1, synthetic_size=200)
    c = load_dataset("synthetic", seed=2, synthetic_size=200)
    _check_common(a)
    assert a.train_x.shape == (200, 3, 16, 16) and a.test_x.shape == (50, 3, 16, 16)
    assert a.num_classes == 10 and a.pad == 2 and a.flip is True
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y, minlength=10).min() == 20  # balanced classes


def test_synthetic_classes_are_distinguishable() -> None:
    d = load_dataset("synthetic", seed=0, synthetic_size=1000)
    xtr = d.train_x.flatten(1).float()
    means = torch.stack([xtr[d.train_y == k].mean(0) for k in range(10)])
    pred = torch.cdist(d.test_x.flatten(1).float(), means).argmin(1)
    acc = (pred == d.test_y).float().mean().item()
    assert acc > 0.5, acc


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*digits.*synthetic.*cifar10.*cifar100.*imagefolder"):
        load_dataset("mnist")


def test_missing_data_dir_is_named(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"--data-dir {missing} does not exist"):
        load_dataset("cifar10", str(missing), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="imagefolder needs --data-dir"):
        load_dataset("imagefolder", cache_dir=str(tmp_path / "cache"))


def test_cifar_without_data_dir_and_no_download(tmp_path) -> None:
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("cifar10", cache_dir=str(tmp_path / "cache"), download=False)
    assert "\n" not in str(info.value) and "cifar-10-batches-py" in str(info.value)
    assert not (tmp_path / "cache" / "torchvision" / "cifar-10-batches-py").exists()
