"""Reading an ImageFolder tree: one sub-folder of images per class, or train/ and test/ (or val/)
folders of such class folders, whose splits are kept. The file list is held compactly and each
image is decoded and resized only when `prepare` asks for it."""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Optional

import numpy as np

from anyorder.data.images import IMAGE_EXTENSIONS, DataError, read_image
from anyorder.data.raw import Images, RawDataset, require_path


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


def load_imagefolder(path: Optional[str], size: int) -> RawDataset:
    """A directory with one sub-folder of images per class -> RawDataset at size x size; or a
    directory with train/ and test/ (or val/) folders of such class folders, whose splits are
    kept (RawDataset.official).

    Class names are the sorted sub-folder names (of train/). Each image is decoded and resized
    on its own when asked for (`Images`), so memory holds one photo at a time.
    """
    root = require_path("imagefolder", path)
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
