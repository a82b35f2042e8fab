"""Reading what the `prepare` stage wrote: one split's images and labels, and its meta.json.

A split is three .npy files (`split_files`). Its images are read a batch at a time (`ImageRows`:
positioned reads of the rows asked for, nothing mapped or cached by the process), so training and
evaluation hold a batch, not the split: the memory of a run does not grow with the data set. The
files are plain .npy, so `np.load(file, mmap_mode="r")` reads them outside this project too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from anyorder.data.images import DataError
from anyorder.data.splits import SPLITS


def split_files(prepared_dir: str | Path, split: str) -> dict[str, Path]:
    """A split's files: x (uint8 images, N x S x S x 3), y (int64 labels), index (int64, each
    image's place in the source's order)."""
    return {part: Path(prepared_dir) / f"{split}_{part}.npy" for part in ("x", "y", "index")}


class ImageRows:
    """The uint8 (N, S, S, 3) images of a .npy file, read on demand with positioned reads.

    Indexing like an array: `rows[i]`, `rows[a:b]` (one read) and `rows[index_array]` return new
    arrays; `len`, `shape`, `dtype`, `ndim`; `np.asarray(rows)` reads everything. Pickles as its
    path, so DataLoader worker processes reopen the file.
    """

    def __init__(self, file: str | Path):
        self.file = Path(file)
        try:
            with open(self.file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
            size = self.file.stat().st_size
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.file}: unreadable or not a .npy file ({exc}); re-run the "
                            f"prepare stage") from exc
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3:
            raise DataError(f"{self.file}: expected uint8 images (N, S, S, 3), found {dtype} "
                            f"{shape}; re-run the prepare stage")
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(np.uint8), 4
        self._row = int(np.prod(shape[1:]))
        if size != self._offset + self._row * shape[0]:
            raise DataError(f"{self.file}: {size} bytes, expected {self._offset + self._row * shape[0]} "
                            f"for {shape[0]} images; the file is incomplete, re-run the prepare stage")
        self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read(self, start: int, count: int) -> np.ndarray:
        """Rows start..start+count-1 in one positioned read."""
        if self._fd is None:
            self._fd = os.open(self.file, os.O_RDONLY)
        want = count * self._row
        data = bytearray(want)
        view, done = memoryview(data), 0
        while done < want:
            got = os.preadv(self._fd, [view[done:]], self._offset + start * self._row + done)
            if got == 0:
                raise DataError(f"{self.file}: ended early; re-run the prepare stage")
            done += got
        return np.frombuffer(data, dtype=np.uint8).reshape((count,) + self.shape[1:])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"image {key} out of range for {len(self)} images")
            return self._read(index, 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._read(start, max(0, stop - start))
            key = np.arange(start, stop, step)
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise IndexError(f"images are indexed by an int, a slice or a 1-d index array, not "
                             f"{key!r}")
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"image index out of range for {len(self)} images")
        out = np.empty((len(index),) + self.shape[1:], dtype=np.uint8)
        order = np.argsort(index, kind="stable")  # read in file order, place in asked order
        for place in order:
            out[place] = self._read(int(index[place]), 1)[0]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def load_split(prepared_dir: str | Path, split: str) -> tuple[ImageRows, np.ndarray]:
    """A prepared directory and a split name -> (images: `ImageRows`, uint8 (N,S,S,3) read on
    demand; labels: int64 (N,) in memory)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    files = split_files(prepared_dir, split)
    for file in (files["x"], files["y"]):
        if not file.is_file():
            raise DataError(f"{file}: no such file; run the prepare stage first (dvc repro "
                            f"prepare)")
    x = ImageRows(files["x"])
    try:
        y = np.load(files["y"], allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{files['y']}: unreadable or incomplete ({exc}); re-run the prepare "
                        f"stage") from exc
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise DataError(f"{files['y']}: expected {len(x)} int64 labels, found {y.dtype} "
                        f"{y.shape}; re-run the prepare stage")
    return x, y


def load_meta(prepared_dir: str | Path) -> dict:
    """A prepared directory -> the dict stored in its meta.json."""
    file = Path(prepared_dir) / "meta.json"
    if not file.is_file():
        raise DataError(f"{file}: no such file; run the prepare stage first (dvc repro prepare)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: not valid JSON ({exc}); re-run the prepare stage") from exc
