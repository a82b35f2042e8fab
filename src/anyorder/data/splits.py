"""Splitting a dataset into train/val/test index sets: seeded and stratified per class, or
keeping the splits a source has of its own."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from anyorder.data.images import DataError

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("official", "pooled")  # keep a source's own splits, or pool and re-split


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """DataError unless both fractions are in (0, 1) and leave room for training."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{name} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no "
                        f"images for training; keep the sum below 1")


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     class_names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Labels (N,) -> {"train", "val", "test"}: sorted, disjoint int64 index arrays covering 0..N-1.

    Per class (ascending label order, one np.random.default_rng(seed) shared by all classes):
    shuffle its indices, take n_test = max(1, round(n * test_fraction)), then
    n_val = max(1, round(n * val_fraction)), the rest is train. A class too small for at least
    one image in each split -> DataError naming it (by `class_names` when given) and its count.
    """
    check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n = len(members)
        # Every class must appear in every split, or per-class metrics become undefined.
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction))
        if n < 3 or n - n_test - n_val < 1:
            name = f"'{class_names[cls]}' (label {cls})" if class_names is not None else f"{cls}"
            raise DataError(f"class {name} has only {n} image(s): too few to put at least one in "
                            f"each of train/val/test (val_fraction={val_fraction}, "
                            f"test_fraction={test_fraction}); add images or remove the class")
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return {name: np.sort(np.concatenate(chunks)).astype(np.int64)
            for name, chunks in parts.items()}


def official_split(labels: np.ndarray, official: dict[str, np.ndarray], val_fraction: float,
                   seed: int, class_names: Optional[Sequence[str]] = None
                   ) -> dict[str, np.ndarray]:
    """The source's own splits kept: test is its test set; val is its val set, or, where it has
    none, a seeded stratified `val_fraction` of each class of its train set (at least one image
    per class, at least one left for training). Sorted int64 index arrays, as stratified_split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    splits = {"test": np.asarray(official["test"], dtype=np.int64)}
    if "val" in official:
        splits["val"] = np.asarray(official["val"], dtype=np.int64)
        splits["train"] = np.asarray(official["train"], dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        train_part, val_part = [], []
        train = np.asarray(official["train"], dtype=np.int64)
        for cls in np.unique(labels[train]):
            members = rng.permutation(train[labels[train] == cls])
            n_val = max(1, round(len(members) * val_fraction))
            if len(members) - n_val < 1:
                name = f"'{class_names[cls]}' (label {cls})" if class_names is not None else cls
                raise DataError(f"class {name} has only {len(members)} training image(s): too few "
                                f"to keep one for validation and one for training; add images")
            val_part.append(members[:n_val])
            train_part.append(members[n_val:])
        splits["train"], splits["val"] = np.concatenate(train_part), np.concatenate(val_part)
    return {name: np.sort(splits[name]) for name in SPLITS}
