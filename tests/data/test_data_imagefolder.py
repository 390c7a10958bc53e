"""Image folders and .tar.gz archives: decoding, extraction/decode caches, and every DataError case."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apart_fast.data import DataError, load_dataset
from apart_fast.data import folder as folder_mod

CLASSES = ["cat", "dog", "eel"]


def _pixels(k: int, i: int, size: tuple[int, int] = (8, 8), grey: bool = False) -> np.ndarray:
    h, w = size
    base = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3)
    arr = ((base * (k + 3) + 17 * i) % 256).astype(np.uint8)
    return arr[:, :, 0] if grey else arr


def _make_tree(root: Path, n_train: int = 3, n_test: int = 2, grey: bool = False, jpeg: bool = True) -> Path:
    """train/ and test/ with 8x8 PNGs per class (plus one JPEG in train/cat when `jpeg`)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_pixels(k, i, grey=grey)).save(d / f"{i:03d}.png")
    if jpeg:
        Image.fromarray(_pixels(0, 99, grey=grey)).save(root / "train" / "cat" / "999.jpg", quality=95)
    return root


def _tar(src: Path, dest: Path, arcname: str | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        if arcname is None:
            for child in sorted(src.iterdir()):
                tar.add(child, arcname=child.name)
        else:
            tar.add(src, arcname=arcname)
    return dest


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("should have used the cache")

    for name in names:
        monkeypatch.setattr(folder_mod, name, boom)


def test_folder_loads_with_sorted_classes_and_exact_pixels(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    d = load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "cache"))
    assert d.classes == CLASSES and d.num_classes == 3
    assert d.train_x.shape == (10, 3, 8, 8) and d.test_x.shape == (6, 3, 8, 8)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64 and d.train_x.is_contiguous()
    assert d.train_y.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert d.pad == 1 and d.flip is True and d.image_size == (8, 8)
    # file order is sorted within a class: cat/000.png is the first example, cat/999.jpg the fourth
    assert torch.equal(d.train_x[0], torch.from_numpy(_pixels(0, 0)).permute(2, 0, 1))
    assert torch.equal(d.test_x[5], torch.from_numpy(_pixels(2, 1)).permute(2, 0, 1))


def test_folder_decode_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_tree(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", str(root), cache_dir=str(cache))
    assert len(list((cache / "folders").glob("*/decoded-*.pt"))) == 2
    with monkeypatch.context() as m:
        _forbid(m, "decode_folder")
        again = load_dataset("imagefolder", str(root), cache_dir=str(cache))
    assert torch.equal(first.train_x, again.train_x) and again.classes == first.classes
    # a changed file changes the key and is decoded afresh
    Image.fromarray(_pixels(1, 50)).save(root / "test" / "dog" / "000.png")
    changed = load_dataset("imagefolder", str(root), cache_dir=str(cache))
    assert torch.equal(changed.test_x[2], torch.from_numpy(_pixels(1, 50)).permute(2, 0, 1))


@pytest.mark.parametrize("arcname", [None, "imgs"])
def test_archive_extracts_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arcname: str | None) -> None:
    root = _make_tree(tmp_path / "imgs")
    archive = _tar(root, tmp_path / "imgs.tar.gz", arcname)
    cache = tmp_path / "cache"
    from_folder = load_dataset("imagefolder", str(root), cache_dir=str(tmp_path / "cache2"))
    d = load_dataset("imagefolder", str(archive), cache_dir=str(cache))
    assert torch.equal(d.train_x, from_folder.train_x) and torch.equal(d.test_y, from_folder.test_y)
    (marker,) = list((cache / "archives").glob("*/COMPLETE"))
    assert marker.parent.name == folder_mod.sha256_file(archive)
    assert [p.name for p in (cache / "archives").iterdir()] == [marker.parent.name]  # no temp leftovers
    stamp = marker.stat().st_mtime_ns
    decoded_stamp = (marker.parent / "decoded-train.pt").stat().st_mtime_ns
    with monkeypatch.context() as m:
        _forbid(m, "_extract_into", "decode_folder")
        again = load_dataset("imagefolder", str(archive), cache_dir=str(cache))
    assert torch.equal(again.train_x, d.train_x)
    assert marker.stat().st_mtime_ns == stamp
    assert (marker.parent / "decoded-train.pt").stat().st_mtime_ns == decoded_stamp
    # decoded caches lost: decoded again from the kept extraction, without re-extracting
    for p in marker.parent.glob("decoded-*.pt"):
        p.unlink()
    with monkeypatch.context() as m:
        _forbid(m, "_extract_into")
        third = load_dataset("imagefolder", str(archive), cache_dir=str(cache))
    assert torch.equal(third.test_x, d.test_x) and marker.stat().st_mtime_ns == stamp


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APART_FAST_CACHE", str(tmp_path / "envcache"))
    root = _make_tree(tmp_path / "imgs", jpeg=False)
    load_dataset("imagefolder", str(_tar(root, tmp_path / "a.tar.gz")))
    assert len(list((tmp_path / "envcache" / "archives").glob("*/COMPLETE"))) == 1


def test_greyscale_only_when_all_images_are_L(tmp_path: Path) -> None:
    grey = load_dataset("imagefolder", str(_make_tree(tmp_path / "g", grey=True)), cache_dir=str(tmp_path / "c"))
    assert grey.channels == 1 and grey.train_x.shape == (10, 1, 8, 8)
    assert torch.equal(grey.train_x[0, 0], torch.from_numpy(_pixels(0, 0, grey=True)))
    mixed_root = _make_tree(tmp_path / "m", grey=True, jpeg=False)
    Image.fromarray(_pixels(2, 7)).save(mixed_root / "test" / "eel" / "777.png")  # one RGB image
    mixed = load_dataset("imagefolder", str(mixed_root), cache_dir=str(tmp_path / "c"))
    assert mixed.channels == 3
    g0 = torch.from_numpy(_pixels(0, 0, grey=True))
    assert all(torch.equal(mixed.train_x[0, c], g0) for c in range(3))  # L replicated, as PIL's convert("RGB")


def _expect_error(tmp_path: Path, data: Path, match: str, name: str = "imagefolder") -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=match) as info:
        load_dataset(name, str(data), cache_dir=str(cache))
    assert "\n" not in str(info.value)
    written = [p for p in cache.rglob("*")] if cache.exists() else []
    assert [p for p in written if p.is_file()] == [], written  # nothing written on failure


def test_missing_split_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    for p in sorted((root / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "test").rmdir()
    _expect_error(tmp_path, root, f"{root} has no test/ folder")
    _expect_error(tmp_path, _tar(root, tmp_path / "a.tar.gz"), "a.tar.gz holds no train/ and test/|has no test/")


def test_class_sets_differ_names_missing_classes(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    for p in (root / "test" / "eel").iterdir():
        p.unlink()
    (root / "test" / "eel").rmdir()
    _expect_error(tmp_path, root, r"test/ lacks \['eel'\]")
    _expect_error(tmp_path, _tar(root, tmp_path / "a.tar.gz"), r"a\.tar\.gz: train and test .*\['eel'\]")


def test_empty_class_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    for p in (root / "train" / "dog").iterdir():
        p.unlink()
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _expect_error(tmp_path, root, f"{root}/train/dog has no image files")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    (root / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _expect_error(tmp_path, root, f"{root}/train/dog/bad.png cannot be decoded")
    _expect_error(tmp_path, _tar(root, tmp_path / "a.tar.gz"), r"a\.tar\.gz/train/dog/bad\.png cannot be decoded")


def test_differing_sizes_name_the_file(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    Image.fromarray(_pixels(2, 0, size=(8, 9))).save(root / "train" / "eel" / "001.png")
    _expect_error(tmp_path, root, f"{root}/train/eel/001.png is 9x8 \\(WxH\\)")
    root2 = _make_tree(tmp_path / "imgs2", jpeg=False)
    for p in (root2 / "test").rglob("*.png"):
        Image.fromarray(_pixels(0, 0, size=(6, 6))).save(p)
    _expect_error(tmp_path, root2, "test/cat/000.png is 6x6")


def test_wrong_class_count_for_cifar(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "imgs")
    _expect_error(tmp_path, root, "has 3 class folders but 10 are expected", name="cifar10")
    _expect_error(tmp_path, _tar(root, tmp_path / "a.tar.gz"), "but 100 are expected", name="cifar100")


def test_broken_torchvision_layout(tmp_path: Path) -> None:
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    _expect_error(tmp_path, tmp_path / "tv", "cifar-10-batches-py cannot be read by torchvision", name="cifar10")


def test_not_an_archive_and_corrupt_archive(tmp_path: Path) -> None:
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    _expect_error(tmp_path, txt, "is a file but not a .tar.gz")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    _expect_error(tmp_path, bad, "bad.tar.gz is not a readable, intact tar archive")


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil_abs.txt", "train/../../evil.txt"])
def test_archive_path_traversal_is_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    _expect_error(tmp_path, archive, "escapes the extraction folder")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists()


def test_archive_symlink_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("train/cat/x.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    _expect_error(tmp_path, archive, "is a link or special file")
