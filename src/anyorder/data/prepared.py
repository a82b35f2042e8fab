"""Reading what the `prepare` stage wrote: one split's images and labels, and its meta.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from anyorder.data.images import DataError
from anyorder.data.splits import SPLITS


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared directory and a split name -> (x uint8 (N,S,S,3), y int64 (N,))."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    file = Path(prepared_dir) / f"{split}.npz"
    if not file.is_file():
        raise DataError(f"{file}: no such file; run the prepare stage first (dvc repro prepare)")
    try:
        with np.load(file, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"{file}: unreadable or incomplete ({exc}); re-run the prepare stage"
                        ) from exc
    if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or len(x) != len(y):
        raise DataError(f"{file}: unexpected contents (x {x.dtype} {x.shape}, y {y.dtype} "
                        f"{y.shape}); re-run the prepare stage")
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
