"""Reading the data sources: CIFAR-10/100 batches, ImageFolder trees and .npz files.

Sources (see `SOURCES`) all return a `RawDataset` whose images are uint8 RGB at the target size,
decoded and resized one at a time when asked for (`Images`): an ImageFolder's photos are never
all in memory at once, and `prepare` writes each image as it reads it. CIFAR's batches and an
.npz are small enough to hold at their stored size (32x32: 150 MB for CIFAR-100); only the
resized images are made on demand. ImageFolder trees are read by `anyorder.data.imagefolder`.
Every problem with the input raises `DataError` naming the file or class at fault and saying how
to fix it.

The embedded default is `data/embedded/digits.npz` in the repository: the 1,797 8x8 handwritten
digits of the UCI collection, as scikit-learn ships them (pixel values 0..16 scaled to 0..255).

Only numpy and the standard library are imported here, besides `anyorder.data`'s own modules.
"""
from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anyorder.data.imagefolder import load_imagefolder
from anyorder.data.images import DataError
from anyorder.data.raw import Images, RawDataset, require_path


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1) uint8 -> (N, H, W, 3) by replicating the gray channel."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


@dataclass(frozen=True)
class _CifarLayout:
    """Where one CIFAR variant keeps its files and which pickle keys hold what."""

    folder: str              # the folder name inside the official archive
    batches: tuple[str, ...]  # data files, in the order they are concatenated
    label_key: bytes
    meta_file: str
    names_key: bytes


_CIFAR10 = _CifarLayout("cifar-10-batches-py",
                        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                        b"labels", "batches.meta", b"label_names")
_CIFAR100 = _CifarLayout("cifar-100-python", ("train", "test"), b"fine_labels", "meta",
                         b"fine_label_names")


def _find_cifar_dir(source: str, path: Optional[str], layout: _CifarLayout) -> Path:
    """`path` (the batch directory itself, or its parent) -> the directory holding the files."""
    root = require_path(source, path)
    expected = list(layout.batches) + [layout.meta_file]
    candidates = [root, root / layout.folder]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in expected):
            return candidate
    if not root.is_dir():
        raise DataError(f"{root}: no such directory for source '{source}' (expected the CIFAR "
                        f"'python version' folder {layout.folder}/ or its parent)")
    # Report the missing files of whichever candidate exists, preferring the official folder.
    where = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [name for name in expected if not (where / name).is_file()]
    raise DataError(f"{where}: not a CIFAR directory for source '{source}': missing "
                    f"{', '.join(missing)} (expected files: {', '.join(expected)}; download and "
                    f"extract the official 'python version' archive)")


def _unpickle(file: Path) -> dict:
    """One CIFAR pickle file -> its dict (keys are bytes, as in the official format)."""
    # The official CIFAR distribution *is* a set of pickles, so there is no safer reader.
    # Unpickling can run arbitrary code: only point this at trusted CIFAR files.
    try:
        with open(file, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "re-extract"
        raise DataError(f"{file}: not a readable CIFAR pickle ({exc}); re-extract the archive"
                        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{file}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _cifar_key(obj: dict, key: bytes, file: Path):
    """obj[key], or DataError naming the file and the missing key."""
    if key not in obj:
        raise DataError(f"{file}: missing key {key!r} (found {sorted(obj)}); is this the right "
                        f"CIFAR variant?")
    return obj[key]


def _load_cifar(layout: _CifarLayout, source: str, path: Optional[str], size: int) -> RawDataset:
    """A CIFAR-10/100 'python version' directory -> all its images (train and test together)."""
    folder = _find_cifar_dir(source, path, layout)
    images, labels, counts = [], [], []
    for name in layout.batches:
        file = folder / name
        batch = _unpickle(file)
        data = np.asarray(_cifar_key(batch, b"data", file), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{file}: b'data' has shape {data.shape}, expected (N, 3072)")
        # Each row is the red plane, then green, then blue, each 32x32 row-major: channel-first.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        batch_labels = np.asarray(_cifar_key(batch, layout.label_key, file), dtype=np.int64)
        if batch_labels.shape != (len(data),):
            raise DataError(f"{file}: {len(batch_labels)} labels for {len(data)} images")
        labels.append(batch_labels)
        counts.append(len(batch_labels))
    meta_file = folder / layout.meta_file
    names = _cifar_key(_unpickle(meta_file), layout.names_key, meta_file)
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    total, test = sum(counts), counts[-1]  # the last file is the official test batch
    return RawDataset(images=Images.of_array(np.concatenate(images), size),
                      labels=np.concatenate(labels), class_names=class_names,
                      official={"train": np.arange(total - test), "test": np.arange(total - test,
                                                                                   total)})


def _npz_class_names(archive, file: Path) -> Optional[list[str]]:
    """The optional `class_names` array of an open .npz -> list of str, or None if absent."""
    if "class_names" not in archive.files:
        return None
    try:
        names = archive["class_names"]
    except ValueError as exc:
        # Object arrays need pickle, which we refuse (allow_pickle=False) for safety.
        raise DataError(f"{file}: class_names is stored as an object array; save it as a string "
                        f"array, e.g. np.array(names, dtype=str)") from exc
    if names.dtype.kind not in "US":
        raise DataError(f"{file}: class_names has dtype {names.dtype}; expected strings, e.g. "
                        f"np.array(names, dtype=str)")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.ravel()]


def _npz_images(x: np.ndarray, file: Path) -> np.ndarray:
    """The `x` array of an .npz -> uint8 (N, H, W, 3), or DataError saying what is wrong."""
    if x.dtype != np.uint8:
        raise DataError(f"{file}: x has dtype {x.dtype}, expected uint8; scale it to 0..255 and "
                        f"convert with .astype(np.uint8)")
    if x.ndim not in (3, 4):
        raise DataError(f"{file}: x has shape {x.shape}; expected (N, H, W), (N, H, W, 1) or "
                        f"(N, H, W, 3)")
    if x.ndim == 4 and x.shape[-1] not in (1, 3):
        raise DataError(f"{file}: x has {x.shape[-1]} channels (shape {x.shape}); expected 1 or 3 "
                        f"channels-last, e.g. (N, H, W, 3)")
    return _to_rgb(x)


def _npz_labels(y: np.ndarray, file: Path) -> np.ndarray:
    """The `y` array of an .npz -> int64 (N,), or DataError saying what is wrong."""
    if y.ndim != 1:
        raise DataError(f"{file}: y has shape {y.shape}; expected one label per image, shape (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{file}: y has dtype {y.dtype}; labels must be integers class indices "
                        f"(convert with .astype(np.int64))")
    return y.astype(np.int64)


def _load_npz(path: Optional[str], size: int) -> RawDataset:
    """An .npz file with `x` images, `y` integer labels and optional `class_names` -> RawDataset."""
    file = require_path("npz", path)
    if not file.is_file():
        raise DataError(f"{file}: no such file for source 'npz' (expected an .npz with arrays x "
                        f"and y, written by np.savez)")
    try:
        # allow_pickle=False: an .npz must never be able to run code when loaded.
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{file}: not a readable .npz file ({exc}); write it with np.savez"
                        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{file}: holds a single array, not an .npz archive; write it with "
                        f"np.savez(file, x=images, y=labels)")
    with archive:
        for key in ("x", "y"):
            if key not in archive.files:
                raise DataError(f"{file}: missing array '{key}' (found {archive.files}); write it "
                                f"with np.savez(file, x=images, y=labels)")
        try:
            x, y = archive["x"], archive["y"]
        except ValueError as exc:
            raise DataError(f"{file}: x or y is an object array ({exc}); store plain numeric "
                            f"arrays") from exc
        class_names = _npz_class_names(archive, file)
    images, labels = _npz_images(x, file), _npz_labels(y, file)
    if len(images) != len(labels):
        raise DataError(f"{file}: x has {len(images)} images but y has {len(labels)} labels; "
                        f"they must match one to one")
    if len(labels) == 0:
        raise DataError(f"{file}: contains no images")
    if labels.min() < 0:
        raise DataError(f"{file}: label {int(labels.min())} is negative; labels must be class "
                        f"indices 0..K-1")
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    if labels.max() >= len(class_names):
        raise DataError(f"{file}: label {int(labels.max())} is out of range for "
                        f"{len(class_names)} class_names (labels must be in "
                        f"0..{len(class_names) - 1})")
    return RawDataset(images=Images.of_array(images, size), labels=labels,
                      class_names=class_names)


# name -> loader(path, image_size). The names are those `data.source` accepts (data/settings.py).
SOURCES: dict[str, Callable[[Optional[str], int], RawDataset]] = {
    "cifar10": functools.partial(_load_cifar, _CIFAR10, "cifar10"),
    "cifar100": functools.partial(_load_cifar, _CIFAR100, "cifar100"),
    "imagefolder": load_imagefolder,
    "npz": _load_npz,
}


def load_source(source: str, path: Optional[str], image_size: int) -> RawDataset:
    """Source name and its path -> RawDataset of image_size x image_size images. An unknown
    source -> DataError listing the known ones."""
    loader = SOURCES.get(source)
    if loader is None:
        raise DataError(f"unknown data source '{source}'; choose one of {', '.join(SOURCES)}")
    if image_size < 1:
        raise DataError(f"image size must be >= 1, got {image_size}")
    return loader(path, image_size)
