"""Named datasets as resident uint8 tensors: digits, synthetic, CIFAR-10/100 and generic image folders."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .folder import (
    LAYOUT_HINT,
    FolderSplits,
    default_cache_dir,
    is_archive,
    load_archive_cached,
    load_folder_cached,
)

DATASET_NAMES = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder")
_CIFAR = {
    # name: (torchvision folder inside root, number of classes)
    "cifar10": ("cifar-10-batches-py", 10),
    "cifar100": ("cifar-100-python", 100),
}


@dataclass
class ImageData:
    """A whole dataset held in memory as uint8 (N,C,H,W) CPU tensors, plus its augmentation defaults."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    pad: int = 4
    flip: bool = True

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Image channels C (1 for greyscale, 3 for RGB)."""
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width (H, W)."""
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])


def _finish(name: str, splits: FolderSplits, pad: int, flip: bool) -> ImageData:
    """Build ImageData with contiguous CPU uint8 images and int64 labels."""
    return ImageData(
        name=name,
        train_x=splits.train_x.to(torch.uint8).contiguous(),
        train_y=splits.train_y.to(torch.int64).contiguous(),
        test_x=splits.test_x.to(torch.uint8).contiguous(),
        test_y=splits.test_y.to(torch.int64).contiguous(),
        classes=list(splits.classes),
        pad=pad,
        flip=flip,
    )


def _load_digits(seed: int) -> ImageData:
    """scikit-learn's 8x8 digits scaled to uint8, split 80/20 by a seeded permutation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.floor(bunch.images * (255.0 / 16.0) + 0.5).clip(0, 255).astype(np.uint8)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(0.8 * len(x)))
    tr, te = perm[:n_train], perm[n_train:]
    splits = FolderSplits(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])
    return _finish("digits", splits, pad=1, flip=False)


def synthetic_patterns(seed: int, size: int = 16, channels: int = 3, num_classes: int = 10) -> torch.Tensor:
    """The per-class smooth patterns (K,C,H,W) in [0,1] behind ``synthetic``: a distinct hue plus an oriented grating.

    The hue keeps classes apart under crops and flips; the grating gives convolutions some shape to find.
    """
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    patterns = torch.empty(num_classes, channels, size, size)
    for k in range(num_classes):
        hue = 2 * math.pi * k / num_classes
        base = torch.tensor([0.5 + 0.25 * math.cos(hue + 2 * math.pi * c / channels) for c in range(channels)])
        theta = math.pi * k / num_classes
        freq = 1.0 + 0.75 * (k % 2)
        phase = torch.rand(channels, generator=gen) * 2 * math.pi
        wave = 2 * math.pi * freq * (math.cos(theta) * xx + math.sin(theta) * yy)
        patterns[k] = base[:, None, None] + 0.2 * torch.sin(wave[None] + phase[:, None, None])
    return patterns.clamp(0, 1)


def _load_synthetic(seed: int, n_train: int) -> ImageData:
    """Deterministic learnable toy data: class pattern + brightness jitter + pixel noise, 3x16x16 uint8."""
    if n_train < 10:
        raise DataError(f"synthetic_size {n_train} is too small; pass at least 10 (one example per class)")
    k = 10
    patterns = synthetic_patterns(seed, num_classes=k)
    gen = torch.Generator().manual_seed(seed + 1)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
        jitter = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
        noise = torch.randn(n, *patterns.shape[1:], generator=gen) * 0.2
        img = (patterns[y] + jitter + noise).clamp(0, 1)
        return torch.round(img * 255).to(torch.uint8), y.to(torch.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(max(1, n_train // 4))
    splits = FolderSplits(train_x, train_y, test_x, test_y, [f"pattern{i}" for i in range(k)])
    return _finish("synthetic", splits, pad=2, flip=True)


def _torchvision_cifar(name: str, root: Path, download: bool) -> FolderSplits:
    """Load CIFAR-10/100 through torchvision from ``root`` (the folder holding its batches folder)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=download)

    def to_x(data: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))

    return FolderSplits(
        to_x(train.data),
        torch.tensor(train.targets, dtype=torch.int64),
        to_x(test.data),
        torch.tensor(test.targets, dtype=torch.int64),
        list(train.classes),
    )


def _torchvision_root(path: Path, name: str) -> Path | None:
    """The folder that holds torchvision's CIFAR batches folder, if ``path`` is (or holds) that layout."""
    folder = _CIFAR[name][0]
    if path.name == folder and path.is_dir():
        return path.parent
    if (path / folder).is_dir():
        return path
    return None


def _cifar_from_torchvision_dir(name: str, root: Path, shown: str) -> FolderSplits:
    """torchvision-layout load with its failures turned into DataError."""
    try:
        return _torchvision_cifar(name, root, download=False)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{shown}/{_CIFAR[name][0]} cannot be read by torchvision ({type(exc).__name__}: {exc}); "
            f"pass an intact torchvision folder or {LAYOUT_HINT}"
        ) from exc


def _load_path(name: str, data_dir: str, cache: Path, num_classes: int | None) -> FolderSplits:
    """Load a folder/.tar.gz path in ImageFolder layout (or, for CIFAR, torchvision's layout)."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"--data-dir {data_dir} does not exist; pass the folder or .tar.gz that holds train/ and test/")
    other: Callable[[Path], FolderSplits | None] | None = None
    if name in _CIFAR:

        def other(tree: Path) -> FolderSplits | None:
            root = _torchvision_root(tree, name)
            if root is None:
                subdirs = [p for p in tree.iterdir() if p.is_dir()]
                root = _torchvision_root(subdirs[0], name) if len(subdirs) == 1 else None
            return None if root is None else _cifar_from_torchvision_dir(name, root, str(path))

    if path.is_file():
        if not is_archive(path):
            raise DataError(f"--data-dir {data_dir} is a file but not a .tar.gz/.tgz/.tar archive; pass {LAYOUT_HINT}")
        return load_archive_cached(path, cache, num_classes, other)
    if other is not None:
        found = other(path)
        if found is not None:
            return found
    return load_folder_cached(path, cache, num_classes)


def _load_cifar(name: str, data_dir: str | None, cache: Path, download: bool) -> ImageData:
    """CIFAR-10/100 from a given path, or torchvision's copy in the cache (downloaded if allowed)."""
    folder, k = _CIFAR[name]
    if data_dir is not None:
        splits = _load_path(name, data_dir, cache, k)
    else:
        root = cache / "torchvision"
        try:
            splits = _torchvision_cifar(name, root, download=download)
        except Exception as exc:
            how = "could not be downloaded" if download else "download=False was given"
            raise DataError(
                f"{name} is not in {root} and {how} ({type(exc).__name__}: {exc}); pass --data-dir with {LAYOUT_HINT}, "
                f"or the folder holding {folder}"
            ) from exc
    if len(splits.classes) != k:
        raise DataError(
            f"--data-dir {data_dir} has {len(splits.classes)} classes but {name} needs {k}; "
            f"point it at the full {name} data"
        )
    return _finish(name, splits, pad=4, flip=True)


def _load_imagefolder(data_dir: str | None, cache: Path) -> ImageData:
    """Any ImageFolder-layout folder or archive; crop padding scales with the image size (32 -> 4)."""
    if data_dir is None:
        raise DataError(f"imagefolder needs --data-dir; pass {LAYOUT_HINT}")
    splits = _load_path("imagefolder", data_dir, cache, None)
    h, w = int(splits.train_x.shape[2]), int(splits.train_x.shape[3])
    return _finish("imagefolder", splits, pad=max(1, round(min(h, w) / 8)), flip=True)


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    seed: int = 0,
    cache_dir: str | None = None,
    synthetic_size: int = 1024,
    download: bool = True,
) -> ImageData:
    """Load dataset ``name`` (digits, synthetic, cifar10, cifar100, imagefolder) fully into uint8 tensors.

    ``seed`` fixes the digits split and the synthetic draw; archives and decoded folders are cached in
    ``cache_dir`` (default ``$APART_FAST_CACHE`` or ``~/.cache/apart_fast``).
    """
    key = name.lower().replace("-", "")
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if key in ("digits", "synthetic") and data_dir is not None:
        raise DataError(f"--data-dir {data_dir} was given but dataset {key} is built in and reads no folder; pass "
                        f"--dataset imagefolder (or cifar10, cifar100) to train on {data_dir}, or drop --data-dir")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        return _load(key, data_dir, seed, cache, synthetic_size, download)
    except OSError as err:  # an unreadable entry of the data, or a cache folder that cannot be written
        where = err.filename or data_dir
        raise DataError(f"cannot use {where} ({err.strerror or err}) while loading {name}; check that the data is "
                        f"readable and the cache folder {cache} writable (set $APART_FAST_CACHE)") from None


def _load(key: str, data_dir: str | None, seed: int, cache: Path, synthetic_size: int, download: bool) -> ImageData:
    """``load_dataset`` for a checked dataset key."""
    if key == "digits":
        return _load_digits(seed)
    if key == "synthetic":
        return _load_synthetic(seed, synthetic_size)
    if key in _CIFAR:
        return _load_cifar(key, data_dir, cache, download)
    return _load_imagefolder(data_dir, cache)


def random_subset(n_all: int, n: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random ``n`` of ``n_all`` examples (None for all): stored splits may be
    class-sorted, so a prefix is not a sample. The same seed gives the same draw everywhere."""
    if n is None or n >= n_all:
        return None
    if n < 1:
        raise DataError(f"subset size {n} is not positive; pass a positive size, or none for the whole split")
    return torch.randperm(n_all, generator=torch.Generator().manual_seed(seed + 17))[:n].sort().values
