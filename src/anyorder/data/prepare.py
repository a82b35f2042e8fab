"""The `prepare` stage: load an image classification dataset, resize it, split it, write it out.

`prepare_dataset` loads a source (`anyorder.data.sources`) at the target size, checks it, splits
it (`anyorder.data.splits`: a source's own test set kept, CIFAR's and an ImageFolder's train/ +
test/; otherwise a seeded stratified train/val/test split) and writes each split as plain .npy
files plus `meta.json` into `out_dir`, atomically and byte-for-byte the same for the same input
(`anyorder.data.prepared` reads them a batch at a time). Images are decoded, resized and written
a chunk at a time, so memory does not grow with the data set. Every problem with the input raises
`DataError` naming the file or class at fault and saying how to fix it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from anyorder.data.images import DataError
from anyorder.data.prepared import split_files
from anyorder.data.raw import Images, RawDataset
from anyorder.data.sources import load_source
from anyorder.data.splits import SPLIT_MODES, check_fractions, official_split, stratified_split
from anyorder.files import atomic_directory, atomic_write_json

# Images decoded and written per chunk: memory holds this many (9.6 MB at 224 px), whatever the
# data set's size.
CHUNK = 64


def validate_dataset(raw: RawDataset, where: str) -> None:
    """Check a RawDataset from any source; DataError (prefixed with `where`) if unusable.

    Requires uint8 (N, H, W, 3) images, int64 labels of the same length, at least two distinct
    class names, every label a valid class index, and every class holding at least one image.
    """
    images, labels, names = raw.images, raw.labels, raw.class_names
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{where}: images must be uint8 (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: {len(images)} images but labels of shape {labels.shape}")
    if len(names) < 2:
        raise DataError(f"{where}: found {len(names)} class(es) {names}; classification needs at "
                        f"least 2")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: class names are not unique: {names}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"{where}: label {bad} is outside 0..{len(names) - 1}")
    counts = np.bincount(labels, minlength=len(names))
    for index in np.flatnonzero(counts == 0):
        raise DataError(f"{where}: class {index} ('{names[index]}') has no images; add some or "
                        f"drop the class")


def _check_out_dir(out_dir: Path) -> None:
    """DataError if `out_dir` exists but is not a directory this stage may replace."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; remove it or choose another "
                        f"output directory")
    # Replacing wipes the directory, so only do it to an empty one or our own earlier output.
    if any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise DataError(f"{out_dir}: exists, is not empty and holds no meta.json, so it is not a "
                        f"prepared dataset; refusing to replace it (choose another directory)")


def prepare_dataset(source: str, path: Optional[str], image_size: int, val_fraction: float,
                    test_fraction: float, seed: int, out_dir: str | Path,
                    split: str = "official") -> dict:
    """Load, validate, resize, split and write a dataset; return the meta dict.

    split: "official" keeps a source's own splits where it has them (CIFAR's test batch, an
    ImageFolder's test/ or val/ folder: `official_split`; test_fraction unused), and splits the
    others stratified; "pooled" pools everything and splits it stratified (numbers then not
    comparable with anyone using the official test set).

    Writes, per split, `{split}_x.npy` (uint8 (N,S,S,3)), `{split}_y.npy` (int64 labels) and
    `{split}_index.npy` (int64, each image's place in the source's order), and out_dir/meta.json,
    the same bytes for the same input. Images are read (decoded and resized by up to `threads`
    threads: PIL releases the GIL) and written `CHUNK` at a time. All files go to a temporary
    sibling directory first, which then replaces out_dir, so a failure at any point leaves out_dir
    as it was.
    """
    out_dir = Path(out_dir)
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    check_fractions(val_fraction, test_fraction)
    if split not in SPLIT_MODES:
        raise DataError(f"unknown split mode {split!r}; choose one of {', '.join(SPLIT_MODES)}")
    _check_out_dir(out_dir)
    raw = load_source(source, path, image_size)
    validate_dataset(raw, f"{path} (source '{source}')" if path else f"source '{source}'")
    images = raw.images
    kept = raw.official is not None and split == "official"
    if kept:
        splits = official_split(raw.labels, raw.official, val_fraction, seed, raw.class_names)
    else:
        splits = stratified_split(raw.labels, val_fraction, test_fraction, seed, raw.class_names)
    num_classes = len(raw.class_names)
    meta = {
        "source": source,
        "path": None if path is None else str(path),
        "image_size": int(image_size),
        "class_names": list(raw.class_names),
        "num_classes": num_classes,
        # official: the source's own splits (those listed in official_splits) were kept
        "split": "official" if kept else ("pooled" if raw.official is not None else "stratified"),
        "official_splits": sorted(raw.official) if kept else [],
        "split_seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": None if kept else float(test_fraction),
        "counts": {name: int(len(index)) for name, index in splits.items()},
        "class_counts": {name: np.bincount(raw.labels[index], minlength=num_classes).tolist()
                         for name, index in splits.items()},
    }
    with atomic_directory(out_dir) as tmp, ThreadPoolExecutor(_threads()) as pool:
        for name, index in splits.items():
            files = split_files(tmp, name)
            _write_images(files["x"], images, index, pool)
            np.save(files["y"], raw.labels[index], allow_pickle=False)
            np.save(files["index"], index, allow_pickle=False)
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def _threads() -> int:
    """Decoding threads: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _write_images(file: Path, images: Images, index: np.ndarray, pool: ThreadPoolExecutor) -> None:
    """images[index] -> a .npy file of uint8 (len(index), S, S, 3), read and written a chunk at a
    time (the header first, then the rows in order: the bytes np.save would write)."""
    shape = (len(index),) + tuple(images.shape[1:])
    with open(file, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False, "shape": shape})
        for start in range(0, len(index), CHUNK):
            for image in pool.map(images.__getitem__, index[start:start + CHUNK].tolist()):
                f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            _return_freed_memory()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another system)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Give the pages of freed memory back to the system. A decoded photo is a few hundred KB,
    which glibc's adaptive mmap threshold soon serves from the heap, where freed blocks fragment:
    without this, prepare's peak RSS grew with the number of images decoded (bench/data_bench.py
    measures it; docs/benchmarks.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
