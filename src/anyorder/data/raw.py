"""What every data source returns: a `RawDataset`, its labels in memory and its images
(`Images`) decoded and resized one at a time when asked for."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anyorder.data.images import DataError, resize_images


class Images:
    """N images of size x size x 3 uint8, each made on demand by `read(i)` (decoded, resized):
    `len`, `shape`, `dtype`, `images[i]`; `np.asarray(images)` stacks them all (small data)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, count: int, size: int, read: Callable[[int], np.ndarray]):
        self.shape = (int(count), int(size), int(size), 3)
        self.ndim = 4
        self._read = read

    @classmethod
    def of_array(cls, images: np.ndarray, size: int) -> "Images":
        """uint8 (N, H, W, 3) held in memory -> Images at `size` (resized one by one, bilinear)."""
        return cls(len(images), size, lambda i: resize_images(images[i:i + 1], size)[0])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise IndexError(f"image index {i!r} out of range for {len(self)} images")
        return self._read(int(i) % len(self))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.uint8)
        for i in range(len(self)):
            out[i] = self[i]
        return out if dtype is None else out.astype(dtype)


@dataclass
class RawDataset:
    """A dataset before splitting: labels in memory, images made one at a time.

    images: `Images`, uint8 (N, size, size, 3); grayscale sources are replicated to 3 channels.
    labels: int64 (N,), values in [0, len(class_names)).
    class_names: one name per class index.
    official: the source's own splits, where it has them ({"train": indices, "test": indices,
      optionally "val": indices}; CIFAR's test batch, an ImageFolder's test/ folder), else None.
    """

    images: Images
    labels: np.ndarray
    class_names: list[str]
    official: Optional[dict[str, np.ndarray]] = None


def require_path(source: str, path: Optional[str]) -> Path:
    """Return `path` as a Path; a missing `path` setting -> DataError."""
    if not path:
        raise DataError(f"source '{source}' needs a path (set data.path to the directory or file "
                        f"holding the dataset)")
    return Path(path).expanduser()
