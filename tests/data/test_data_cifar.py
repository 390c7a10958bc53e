"""CIFAR-10 from the shared JPEG archive (slow on first run: decodes 60k images into the default cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apart_fast.data import load_dataset

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 JPEG archive not found at {ARCHIVE}")
def test_cifar10_jpeg_archive() -> None:
    d = load_dataset("cifar10", str(ARCHIVE))  # default cache: a second run reuses the decoded tensors
    assert d.name == "cifar10" and d.classes == CIFAR10_CLASSES and d.num_classes == 10
    assert d.train_x.shape == (50_000, 3, 32, 32) and d.test_x.shape == (10_000, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64 and d.train_x.is_contiguous()
    assert torch.bincount(d.train_y, minlength=10).tolist() == [5_000] * 10
    assert torch.bincount(d.test_y, minlength=10).tolist() == [1_000] * 10
    assert d.pad == 4 and d.flip is True and d.image_size == (32, 32) and d.channels == 3
    means = d.test_x.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.494, 0.485, 0.450]), atol=2e-3), means
