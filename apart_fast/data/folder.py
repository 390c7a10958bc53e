"""Image folders and .tar.gz archives: safe cached extraction and cached uint8 decoding.

An archive is extracted once into ``<cache>/archives/<sha256>/`` (atomic rename, completion marker);
decoded tensors live beside it (``decoded-train.pt`` / ``decoded-test.pt``). A plain folder's decoded
tensors live in ``<cache>/folders/<key>/``, the key hashing what is read: every listed image's resolved path
(through any symlinked folder), size, mtime and ctime, and its label.

Pixels: 16-bit greyscale is scaled to 8 bits; transparent pixels are composited over grey ``BACKGROUND`` (the
default ``--pad-value`` 0.5) with one warning per load; an image is checked against Pillow's decompression-bomb
limit and the first image's size from its header, before it is decoded.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .errors import DataError, warn

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MARKER = "COMPLETE"
SPLITS = ("train", "test")
_CACHE_FORMAT = 2  # 2: transparent pixels composited over BACKGROUND (1 dropped the alpha channel)
BACKGROUND = 128  # grey 128/255 ~ the default --pad-value 0.5
_DECODE_WORKERS = 3
_CHUNK = 256

LAYOUT_HINT = "a folder or .tar.gz holding train/<class>/* and test/<class>/*"


def default_cache_dir() -> Path:
    """The cache root: ``$APART_FAST_CACHE`` if set, else ``~/.cache/apart_fast``."""
    env = os.environ.get("APART_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "apart_fast"


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a tar archive by its suffix (.tar.gz, .tgz, .tar)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large archives never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Reject members that could write outside the extraction folder or are not plain files/folders."""
    name = member.name
    parts = Path(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(
            f"{archive} member {name!r} escapes the extraction folder; rebuild the archive with relative paths"
        )
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive} member {name!r} is a link or special file; rebuild the archive with plain files only"
        )


def _read_to_end(tar: tarfile.TarFile, archive: Path) -> None:
    """Read the (decompressed) stream past the last member to its end: a compressed archive's checksum
    is verified there, and anything but zero padding means a damaged header cut the listing short."""
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    while block := fileobj.read(1 << 20):
        if block.count(0) != len(block):
            raise DataError(f"{archive} is damaged: its listing stops at byte {tar.offset} of the tar stream but data "
                            "follows (a corrupted member header); pass an intact archive")


def _extract_into(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` after reading all of it (checksums included) and checking every
    member; DataError on a bad archive."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _read_to_end(tar, archive)
            for member in members:
                _check_member(member, archive)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - old Pythons without extraction filters
                tar.extractall(dest, members=members)
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(
            f"{archive} is not a readable, intact tar archive ({type(exc).__name__}: {exc}); pass an intact .tar.gz or the folder"
        ) from exc


def find_split_root(base: Path) -> Path | None:
    """The folder under ``base`` (itself or its single sub-folder) that holds train/ and test/, if any."""
    if (base / "train").is_dir() or (base / "test").is_dir():
        return base
    subdirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and ((subdirs[0] / "train").is_dir() or (subdirs[0] / "test").is_dir()):
        return subdirs[0]
    return None


def materialize_archive(archive: Path, cache_dir: Path, prepare: Callable[[Path], None]) -> Path:
    """Return the cached extraction folder of ``archive``, extracting it once if needed.

    ``prepare(slot)`` runs on a fresh extraction before it is committed (it validates and may write
    decoded caches into ``slot``); if it raises, the temporary extraction is removed and nothing stays.
    """
    digest = sha256_file(archive)
    root = cache_dir / "archives"
    final = root / digest
    if (final / MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the committed cache should read like any folder
    try:
        _extract_into(archive, tmp / "tree")
        prepare(tmp)
        (tmp / MARKER).write_bytes(os.fsencode(archive) + b"\n")
        if final.exists():  # a stale, unmarked slot from a crashed run, or a concurrent winner
            if (final / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MARKER).is_file():  # another process committed first
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class FolderSplits:
    """Decoded uint8 tensors (N,C,H,W) and int64 labels of an image folder's train/ and test/ splits."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    transparent: tuple[int, str] = (0, "")  # images with transparent pixels composited over BACKGROUND, the first's name


def _entries(folder: Path) -> list[Path]:
    """The visible entries of ``folder``; DataError on a dangling or looping symlink (it would be skipped silently)."""
    out = []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise DataError(f"{p} is a symlink that leads nowhere (dangling or looping); fix the link or remove it")
        out.append(p)
    return out


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden and non-image files skipped), sorted by name."""
    return sorted(p for p in _entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split."""
    return sorted(p.name for p in _entries(split_dir) if p.is_dir())


def scan_folder(
    root: Path, shown: str, num_classes: int | None = None
) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Validate the train/test layout under ``root`` and list (file, label) per split.

    ``shown`` is how the root is named in errors (the archive path for extracted archives).
    """
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{shown} has no {split}/ folder; pass {LAYOUT_HINT}")
    train_classes = _list_classes(root / "train")
    test_classes = _list_classes(root / "test")
    if not train_classes:
        raise DataError(f"{shown}/train has no class folders; put images in train/<class>/ folders")
    if train_classes != test_classes:
        missing_test = sorted(set(train_classes) - set(test_classes))
        missing_train = sorted(set(test_classes) - set(train_classes))
        parts = []
        if missing_test:
            parts.append(f"test/ lacks {missing_test}")
        if missing_train:
            parts.append(f"train/ lacks {missing_train}")
        raise DataError(
            f"{shown}: train and test class folders differ ({'; '.join(parts)}); give both splits the same classes"
        )
    if num_classes is not None and len(train_classes) != num_classes:
        raise DataError(
            f"{shown} has {len(train_classes)} class folders but {num_classes} are expected; "
            "point --data-dir at the full dataset"
        )
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        entries: list[tuple[Path, int]] = []
        for label, cls in enumerate(train_classes):
            images = _list_images(root / split / cls)
            if not images:
                raise DataError(
                    f"{shown}/{split}/{cls} has no image files; add images or remove the class from both splits"
                )
            entries.extend((p, label) for p in images)
        files[split] = entries
    return train_classes, files


def _open_image(path: Path, shown: str, size: tuple[int, int] | None = None) -> tuple[Image.Image, bool]:
    """Open and fully decode one image as 8-bit L or RGB, and whether it had transparent pixels; DataError naming the
    file when it is unreadable, over Pillow's decompression-bomb limit, or (``size``: (W, H) expected) of another size,
    the last two judged from its header before anything is decoded.

    16-bit greyscale (PIL modes I;16*, and I with values up to 65535) is scaled to 8 bits (v/257), not clipped;
    other high-depth modes (32-bit integer, float) are refused. Transparent pixels (an alpha channel, or a palette
    or colour-key transparency) are composited over grey ``BACKGROUND``.
    """
    try:
        with Image.open(path) as img:
            if size is not None and img.size != size:
                raise DataError(f"{shown} is {img.size[0]}x{img.size[1]} (WxH) but the images before it are "
                                f"{size[0]}x{size[1]}; resize all images to one size")
            img.load()
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                grey = img.mode in ("L", "LA", "La")
                if rgba.getchannel("A").getextrema()[0] == 255:  # an alpha channel, every pixel opaque
                    return rgba.convert("L" if grey else "RGB"), False
                back = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
                return Image.alpha_composite(back, rgba).convert("L" if grey else "RGB"), True
            if img.mode in ("L", "RGB"):
                return img.copy(), False
            if img.mode.startswith("I"):
                arr = np.asarray(img).astype(np.int64)
                if arr.min() < 0 or arr.max() > 65535:
                    raise DataError(f"{shown} holds {img.mode} pixels from {arr.min()} to {arr.max()}, not 8 or 16 bits; "
                                    "convert it to an 8- or 16-bit image")
                return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8)), False
            if img.mode == "F":
                raise DataError(f"{shown} holds floating-point pixels; convert it to an 8- or 16-bit image")
            return img.convert("RGB"), False
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:  # a warning made an error: _decode_all
        raise DataError(f"{shown} is too large to decode safely ({exc}); resize it (all images must be one size)") from None
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(
            f"{shown} cannot be decoded as an image ({type(exc).__name__}: {exc}); replace or remove it"
        ) from exc


def _decode_all(entries: list[tuple[Path, int]], root: Path, shown: str,
                desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image to an (N,H,W,3) uint8 array, a per-image flag saying it was mode L, and the names of the
    images with transparent pixels. Pillow's decompression-bomb warning is an error here (naming the file)."""
    with warnings.catch_warnings():  # the decoding threads consult the filters this thread sets
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _decode_entries(entries, root, shown, desc)


def _decode_entries(entries: list[tuple[Path, int]], root: Path, shown: str,
                    desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``_decode_all`` under its warning filter."""

    def name(p: Path) -> str:
        return f"{shown}/{p.relative_to(root).as_posix()}"

    first_path = entries[0][0]
    first, _ = _open_image(first_path, name(first_path))
    width, height = first.size
    out = np.empty((len(entries), height, width, 3), dtype=np.uint8)
    grey = np.zeros(len(entries), dtype=bool)
    clear = np.zeros(len(entries), dtype=bool)
    progress = tqdm(total=len(entries), desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)
    lock = threading.Lock()

    def work(start: int) -> None:
        stop = min(start + _CHUNK, len(entries))
        for i in range(start, stop):
            path = entries[i][0]
            img, clear[i] = _open_image(path, name(path), (width, height))
            arr = np.asarray(img)
            if img.mode == "L":
                grey[i] = True
                out[i] = arr[:, :, None]
            else:
                out[i] = arr
        with lock:
            progress.update(stop - start)

    try:
        starts = range(0, len(entries), _CHUNK)
        if len(entries) <= _CHUNK:
            for s in starts:
                work(s)
        else:
            with ThreadPoolExecutor(max_workers=_DECODE_WORKERS) as pool:
                futures = [pool.submit(work, s) for s in starts]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # stop decoding after the first bad file
                    raise
    finally:
        progress.close()
    return out, grey, [name(entries[i][0]) for i in np.flatnonzero(clear)]


def decode_folder(root: Path, shown: str, num_classes: int | None = None,
                  listing: tuple[list[str], dict[str, list[tuple[Path, int]]]] | None = None) -> FolderSplits:
    """Decode an ImageFolder train/test tree (``listing``: its ``scan_folder``, if done) to uint8 tensors; greyscale
    only if every image is mode L."""
    classes, files = listing if listing is not None else scan_folder(root, shown, num_classes)
    arrays = {}
    greys = {}
    clear: list[str] = []
    for split in SPLITS:
        arrays[split], greys[split], names = _decode_all(files[split], root / split, f"{shown}/{split}", f"decode {split}")
        clear += names
    sizes = {split: arrays[split].shape[1:3] for split in SPLITS}
    if sizes["train"] != sizes["test"]:
        h, w = sizes["test"]
        th, tw = sizes["train"]
        raise DataError(
            f"{shown}/test/{files['test'][0][0].relative_to(root / 'test').as_posix()} is {w}x{h} (WxH) "
            f"but train images "
            f"are {tw}x{th}; resize all images to one size"
        )
    all_grey = all(bool(greys[s].all()) for s in SPLITS)
    tensors = {}
    for split in SPLITS:
        arr = arrays[split][..., :1] if all_grey else arrays[split]
        tensors[split] = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    labels = {s: torch.tensor([lab for _, lab in files[s]], dtype=torch.int64) for s in SPLITS}
    return FolderSplits(tensors["train"], labels["train"], tensors["test"], labels["test"], classes,
                        (len(clear), clear[0] if clear else ""))


def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_decoded(splits: FolderSplits, slot: Path) -> None:
    """Write one ``decoded-<split>.pt`` per split into ``slot``."""
    for split in SPLITS:
        x, y = (splits.train_x, splits.train_y) if split == "train" else (splits.test_x, splits.test_y)
        _save_atomic({"format": _CACHE_FORMAT, "x": x, "y": y, "classes": list(splits.classes),
                      "transparent": list(splits.transparent)}, slot / f"decoded-{split}.pt")


def load_decoded(slot: Path) -> FolderSplits | None:
    """Read the decoded caches of ``slot``; None when absent, stale or unreadable."""
    parts = {}
    for split in SPLITS:
        path = slot / f"decoded-{split}.pt"
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT:
            return None
        parts[split] = obj
    if parts["train"]["classes"] != parts["test"]["classes"]:
        return None
    return FolderSplits(
        parts["train"]["x"],
        parts["train"]["y"],
        parts["test"]["x"],
        parts["test"]["y"],
        list(parts["train"]["classes"]),
        tuple(parts["train"].get("transparent", (0, ""))),
    )


def note_transparency(splits: FolderSplits) -> None:
    """Say once per load that (and where) transparent pixels were composited over ``BACKGROUND``."""
    n, first = splits.transparent
    if n:
        warn(f"{n} image(s) with transparent pixels (the first: {first}) composited over grey {BACKGROUND}/255 (the "
             "default --pad-value); save them without transparency over the background you want to choose another")


def folder_cache_key(root: Path, listing: tuple[list[str], dict[str, list[tuple[Path, int]]]]) -> str:
    """Hash of what decoding ``root`` reads (``listing``: its ``scan_folder``): the classes and, per image, its label
    and the resolved path, size, mtime and ctime of the file it leads to, so a symlinked folder or file whose target
    changed, or a file rewritten in place, is decoded again."""
    classes, files = listing
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\0".encode() + b"\0".join(map(os.fsencode, classes)))
    for split in SPLITS:
        for path, label in files[split]:
            st = os.stat(path)
            digest.update(b"\n%s\0%d\0%d\0%d\0%d" % (os.fsencode(os.path.realpath(path)), label, st.st_size,
                                                       st.st_mtime_ns, st.st_ctime_ns))
    return digest.hexdigest()


def load_folder_cached(root: Path, cache_dir: Path, num_classes: int | None = None) -> FolderSplits:
    """Decode a plain image folder, reusing ``<cache>/folders/<key>/`` when what it reads is unchanged."""
    listing = scan_folder(root, str(root), num_classes)  # fail fast, before hashing or writing anything
    slot = cache_dir / "folders" / folder_cache_key(root, listing)
    splits = load_decoded(slot)
    if splits is None:
        splits = decode_folder(root, str(root), num_classes, listing)
        save_decoded(splits, slot)
    note_transparency(splits)
    return splits


def load_archive_cached(
    archive: Path,
    cache_dir: Path,
    num_classes: int | None = None,
    other_layout: Callable[[Path], FolderSplits | None] | None = None,
) -> FolderSplits:
    """Extract ``archive`` once (validated before commit) and return its decoded splits, cached beside it.

    ``other_layout(tree)`` may recognise a non-ImageFolder layout (e.g. torchvision's CIFAR pickles) and
    return its splits; otherwise the tree must hold train/ and test/ (at its top or in one sub-folder).
    """
    shown = str(archive)

    def decode(tree: Path) -> FolderSplits:
        if other_layout is not None:
            found = other_layout(tree)
            if found is not None:
                return found
        root = find_split_root(tree)
        if root is None:
            raise DataError(f"{shown} holds no train/ and test/ folders; pass {LAYOUT_HINT}")
        return decode_folder(root, shown, num_classes)

    fresh: list[FolderSplits] = []

    def prepare(slot: Path) -> None:
        splits = decode(slot / "tree")
        save_decoded(splits, slot)
        fresh.append(splits)

    final = materialize_archive(archive, cache_dir, prepare)
    splits = fresh[0] if fresh else load_decoded(final)
    if splits is None:  # decoded caches deleted or stale: decode the kept extraction again
        splits = decode(final / "tree")
        save_decoded(splits, final)
    if num_classes is not None and len(splits.classes) != num_classes:
        raise DataError(
            f"{shown} has {len(splits.classes)} classes but {num_classes} are expected; "
            "point --data-dir at the full dataset"
        )
    note_transparency(splits)
    return splits
