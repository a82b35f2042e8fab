"""On-disk data sets for the data tests, built small in the real formats: CIFAR pickles, an
ImageFolder tree, npz archives; and `png`, an image as the bytes of an upload."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

def png(image: np.ndarray, mode=None) -> bytes:
    """A uint8 image (H, W, 3) as PNG bytes (`mode`: PIL's, for grey or palette uploads)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode).save(buffer, "PNG")
    return buffer.getvalue()


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]

# ---------------------------------------------------------------------------------------------
# Fixture writers: the real on-disk formats, built small
# ---------------------------------------------------------------------------------------------

def _pickle(file: Path, obj: dict) -> None:
    with open(file, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture()
def cifar10_dir(tmp_path: Path) -> Path:
    """cifar-10-batches-py/ with 5 train batches + test_batch of 4 images each, 10 classes."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        rows = _cifar_rows(4, b)
        if b == 0:
            rows[0] = 0
            rows[0, :1024] = 255               # image 0: pure red
            rows[1] = 0
            rows[1, 1024 + 1 * 32 + 5] = 77    # image 1: green plane, row 1, column 5
        labels = [(4 * b + i) % 10 for i in range(4)]
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels,
                                b"data": rows, b"filenames": [b"x.png"] * 4})
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                      b"num_cases_per_batch": 4, b"num_vis": 3072})
    return folder


@pytest.fixture()
def cifar100_dir(tmp_path: Path) -> Path:
    """cifar-100-python/ with train (100 images, one per fine class) and test (10 images)."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_rows(100, 0)
    train[3] = 0
    train[3, 2048:] = 255                      # image 3: pure blue
    _pickle(folder / "train", {b"data": train, b"fine_labels": list(range(100)),
                               b"coarse_labels": [i // 5 for i in range(100)]})
    _pickle(folder / "test", {b"data": _cifar_rows(10, 1), b"fine_labels": list(range(10)),
                              b"coarse_labels": [0] * 10})
    _pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """cat/: two grayscale PNGs (12x10, 20x20); dog/: a colour JPEG (16x8) and a .PNG."""
    root = tmp_path / "pets"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(np.full((10, 12), 200, np.uint8), mode="L").save(root / "cat" / "a.png")
    Image.fromarray(np.full((20, 20), 50, np.uint8), mode="L").save(root / "cat" / "b.png")
    red = np.zeros((8, 16, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(root / "dog" / "c.jpg", quality=95)
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).save(root / "dog" / "D.PNG")
    (root / "dog" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    return root


def _write_npz(file: Path, **arrays) -> str:
    np.savez(file, **arrays)
    return str(file)


def _balanced_npz(file: Path, n_per_class: int = 10, classes: int = 3, size: int = 6) -> str:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n_per_class * classes, size, size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(classes), n_per_class)
    return _write_npz(file, x=x, y=y,
                      class_names=np.array([f"c{i}" for i in range(classes)]))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
