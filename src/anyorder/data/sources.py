"""Reading the data sources: CIFAR-10/100 batches, ImageFolder trees and .npz files.

Sources (see `SOURCES`) all return a `RawDataset` whose images are uint8 RGB at the target size,
decoded and resized one at a time when asked for (`Images`): an ImageFolder's photos are never
all in memory at once, and `prepare` writes each image as it reads it. CIFAR's batches and an
.npz are small enough to hold at their stored size (32x32: 150 MB for CIFAR-100); only the
resized images are made on demand. Every problem with the input raises `DataError` naming the file or class at fault and
saying how to fix it.

The embedded default is `data/embedded/digits.npz` in the repository: the 1,797 8x8 handwritten
digits of the UCI collection, as scikit-learn ships them (pixel values 0..16 scaled to 0..255).

Only numpy and the standard library are imported here, besides `anyorder.data.images`.
"""
from __future__ import annotations

import bisect
import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anyorder.data.images import IMAGE_EXTENSIONS, DataError, read_image, resize_images


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


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1) uint8 -> (N, H, W, 3) by replicating the gray channel."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


def _require_path(source: str, path: Optional[str]) -> Path:
    """Return `path` as a Path; a missing `path` setting -> DataError."""
    if not path:
        raise DataError(f"source '{source}' needs a path (set data.path to the directory or file "
                        f"holding the dataset)")
    return Path(path).expanduser()


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
    root = _require_path(source, path)
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


def _image_files(class_dir: Path) -> list[str]:
    """Image files anywhere below `class_dir` (any extension case), hidden ones skipped, as paths
    relative to `class_dir`, in the order of their paths compared folder by folder (pathlib's).

    A sub-folder that cannot be listed is an error naming it, not a silent gap in the class
    (pathlib's rglob skips unreadable folders without a word). Symbolic links to folders are not
    followed; links to files are.
    """
    files: list[str] = []
    _walk_images(str(class_dir), "", files)
    return files


def _walk_images(folder: str, prefix: str, files: list[str]) -> None:
    """Append `folder`'s image files (as `prefix` + name) to `files`, sub-folders at their place
    in name order (a file 'b.png' before a folder 'c/'). A module-level function, not a nested
    one: a recursive closure is a reference cycle that keeps the list alive until the garbage
    collector runs."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DataError(f"{exc.filename or folder}: cannot list this folder ({reason}); fix "
                        f"its permissions or remove it from the data set") from exc
    # Hidden entries are skipped: macOS '._x.png' resource forks and notebook checkpoints carry
    # image extensions but are not images of the class.
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk_images(entry.path, prefix + entry.name + os.sep, files)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            files.append(prefix + entry.name)


class _FileTable:
    """The image files of an ImageFolder, compactly: per class folder, its files' relative names
    as one bytes array (about 10 bytes per image where a Path takes 500): the file list is all
    `prepare` holds per image, so its memory barely grows with the data set."""

    def __init__(self):
        self._folders: list[str] = []
        self._names: list[np.ndarray] = []
        self._starts = [0]

    def add(self, folder: Path, names: list[str]) -> None:
        self._folders.append(str(folder))
        self._names.append(np.array([os.fsencode(name) for name in names], dtype=bytes))
        self._starts.append(self._starts[-1] + len(names))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> str:
        group = bisect.bisect_right(self._starts, i) - 1
        return os.path.join(self._folders[group],
                            os.fsdecode(self._names[group][i - self._starts[group]]))


def _class_folders(root: Path) -> list[Path]:
    """The sub-folders of `root` (sorted, hidden ones skipped); DataError if it cannot be listed."""
    try:
        return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{root}: cannot list this folder ({exc.strerror or exc})") from exc


def _split_folders(root: Path) -> Optional[dict[str, Path]]:
    """An ImageFolder tree that keeps its own splits: train/ with test/ and/or val/ beside it,
    each holding class sub-folders -> {"train", "test"[, "val"]: folder}; val/ alone is the test
    set (as ImageNet's). None for a plain tree of class folders."""
    names = {d.name: d for d in _class_folders(root)}
    if "train" not in names or not {"test", "val"} & set(names) or not _class_folders(
            names["train"]):
        return None
    others = sorted(set(names) - {"train", "val", "test"})
    if others:
        raise DataError(f"{root}: holds the split folders train/ and {'test/' if 'test' in names else 'val/'} "
                        f"beside other folders ({', '.join(others)}); keep only train/, val/ and "
                        f"test/ (each with one sub-folder per class), or only class folders")
    if "test" in names:
        return {split: names[split] for split in ("train", "val", "test") if split in names}
    return {"train": names["train"], "test": names["val"]}


def _load_imagefolder(path: Optional[str], size: int) -> RawDataset:
    """A directory with one sub-folder of images per class -> RawDataset at size x size; or a
    directory with train/ and test/ (or val/) folders of such class folders, whose splits are
    kept (RawDataset.official).

    Class names are the sorted sub-folder names (of train/). Each image is decoded and resized
    on its own when asked for (`Images`), so memory holds one photo at a time.
    """
    root = _require_path("imagefolder", path)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory for source 'imagefolder' (expected a folder "
                        f"with one sub-folder of images per class)")
    splits = _split_folders(root) or {"all": root}
    class_names = [d.name for d in _class_folders(splits.get("train", root))]
    if not class_names:
        raise DataError(f"{root}: no class sub-folders found (put the images of each class in "
                        f"their own sub-folder, e.g. {root}/cat/1.png)")
    files, labels, official = _FileTable(), [], {}
    for split, folder in splits.items():
        found = [d.name for d in _class_folders(folder)]
        if found != class_names:
            extra = sorted(set(found) - set(class_names))
            lacking = sorted(set(class_names) - set(found))
            raise DataError(f"{folder}: its class folders differ from {splits['train']}'s "
                            f"({'not in train/: ' + ', '.join(extra) if extra else ''}"
                            f"{'; ' if extra and lacking else ''}"
                            f"{'missing: ' + ', '.join(lacking) if lacking else ''}); every split "
                            f"needs the same class folders")
        start = len(files)
        for index, name in enumerate(class_names):
            class_files = _image_files(folder / name)
            if not class_files:
                raise DataError(f"{folder / name}: class folder '{name}' has no images "
                                f"({'/'.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
            files.add(folder / name, class_files)
            labels.append(np.full(len(class_files), index, dtype=np.int64))
        official[split] = np.arange(start, len(files))
    return RawDataset(images=Images(len(files), size, lambda i: read_image(files[i], size)),
                      labels=np.concatenate(labels),
                      class_names=class_names, official=None if "all" in official else official)


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
    file = _require_path("npz", path)
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
    "imagefolder": _load_imagefolder,
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
