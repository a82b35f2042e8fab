"""Every data source on real on-disk fixtures, the splits, and prepare's atomic write
(anyorder.data); bad data sets: tests/test_data_errors.py."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anyorder.data import prepare as data
from anyorder.data.images import DataError, resize_images
from anyorder.data.prepared import load_meta, load_split
from anyorder.data.sources import SOURCES, load_source
from anyorder.data.splits import stratified_split
from data_fixtures import (CIFAR10_NAMES, _balanced_npz, _cifar_rows, _leftovers, _pickle,
                           _snapshot, _write_npz)
from data_fixtures import cifar10_dir, cifar100_dir, image_folder  # noqa: F401  (fixtures)

EMBEDDED = Path(__file__).resolve().parents[1] / "data" / "embedded" / "digits.npz"


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def test_every_source_the_settings_accept_has_a_loader():
    import typing
    from anyorder.data.settings import DataConfig
    accepted = typing.get_args(typing.get_type_hints(DataConfig)["source"])
    assert set(accepted) == set(SOURCES)


def test_embedded_default_is_scikit_learns_digits():
    """The file the default pipeline reads is the data set it says it is (no silent edits)."""
    from sklearn.datasets import load_digits
    raw = load_source("npz", str(EMBEDDED), 8)
    bunch = load_digits()
    assert raw.images.shape == (1797, 8, 8, 3) and raw.images.dtype == np.uint8
    assert np.array_equal(raw.labels, bunch.target)
    assert raw.class_names == [str(i) for i in range(10)]
    expected = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    assert all(np.array_equal(np.asarray(raw.images)[..., c], expected) for c in range(3))


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10(cifar10_dir: Path, use_parent: bool):
    path = cifar10_dir.parent if use_parent else cifar10_dir
    raw = load_source("cifar10", str(path), 32)
    assert raw.images.shape == (24, 32, 32, 3) and raw.images.dtype == np.uint8
    assert raw.labels.dtype == np.int64
    assert raw.labels.tolist() == [i % 10 for i in range(24)]
    assert raw.class_names == CIFAR10_NAMES
    # Channel-first rows decode to channels-last images.
    assert (np.asarray(raw.images)[0, :, :, 0] == 255).all()
    assert (np.asarray(raw.images)[0, :, :, 1:] == 0).all()
    assert np.asarray(raw.images)[1, 1, 5, 1] == 77 and np.asarray(raw.images)[1].sum() == 77
    # test_batch comes last: its first row is the 21st image.
    with open(cifar10_dir / "test_batch", "rb") as f:
        test_rows = pickle.load(f, encoding="bytes")[b"data"]
    assert np.array_equal(np.asarray(raw.images)[20], test_rows[0].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar100(cifar100_dir: Path, use_parent: bool):
    path = cifar100_dir.parent if use_parent else cifar100_dir
    raw = load_source("cifar100", str(path), 32)
    assert raw.images.shape == (110, 32, 32, 3)
    assert raw.labels.tolist() == list(range(100)) + list(range(10))
    assert raw.class_names == [f"fine{i}" for i in range(100)]
    assert (np.asarray(raw.images)[3, :, :, 2] == 255).all() and (np.asarray(raw.images)[3, :, :, :2] == 0).all()


def test_cifar_missing_file_lists_expected(cifar10_dir: Path):
    (cifar10_dir / "data_batch_3").unlink()
    with pytest.raises(DataError) as info:
        load_source("cifar10", str(cifar10_dir.parent), 32)
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "data_batch_3" in message
    assert "batches.meta" in message  # the full list of expected files


def test_cifar_corrupt_pickle_names_file(cifar100_dir: Path):
    (cifar100_dir / "test").write_bytes(b"garbage, not a pickle")
    with pytest.raises(DataError, match="test"):
        load_source("cifar100", str(cifar100_dir), 32)


def test_imagefolder(image_folder: Path):
    raw = load_source("imagefolder", str(image_folder), 12)
    assert raw.class_names == ["cat", "dog"]
    assert raw.labels.tolist() == [0, 0, 1, 1]
    # Every image is resized to the target size as it is read, whatever its own size.
    assert raw.images.shape == (4, 12, 12, 3) and raw.images.dtype == np.uint8
    assert (np.asarray(raw.images)[0] == 200).all()          # grayscale replicated to 3 channels
    assert (np.asarray(raw.images)[1] == 50).all()
    # Files are read in sorted path order, where upper case comes first.
    assert (np.asarray(raw.images)[2] == 90).all()           # dog/D.PNG: upper-case extension
    jpeg = np.asarray(raw.images)[3].astype(int)             # dog/c.jpg: red, up to JPEG error
    assert (jpeg[..., 0] > 230).all() and (jpeg[..., 1:] < 25).all()


def test_cifar_keeps_its_official_test_set(cifar10_dir: Path, tmp_path: Path):
    raw = load_source("cifar10", str(cifar10_dir), 32)
    assert raw.official["test"].tolist() == list(range(20, 24))   # test_batch, last
    # The fixture's 2 images per class are too few to carve val from: 5 batches of 16 instead
    # (classes 0-5: 10 training images each, 6-9: 5).
    for b in range(1, 6):
        rows = _cifar_rows(16, b)
        _pickle(cifar10_dir / f"data_batch_{b}", {b"labels": [i % 10 for i in range(16)],
                                                  b"data": rows})
    meta = data.prepare_dataset("cifar10", str(cifar10_dir), 32, 0.25, 0.2, 0, tmp_path / "p")
    test_x, test_y = load_split(tmp_path / "p", "test")
    with open(cifar10_dir / "test_batch", "rb") as f:
        official = pickle.load(f, encoding="bytes")
    assert np.array_equal(test_x, official[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert test_y.tolist() == official[b"labels"]
    assert meta["split"] == "official" and meta["official_splits"] == ["test", "train"]
    assert meta["counts"] == {"train": 64, "val": 16, "test": 4}  # val: 6 x 2 + 4 x 1
    assert np.load(tmp_path / "p" / "val_index.npy").max() < 80  # val from the train batches
    pooled = data.prepare_dataset("cifar10", str(cifar10_dir), 32, 0.25, 0.2, 0, tmp_path / "q",
                                  split="pooled")
    assert pooled["split"] == "pooled" and pooled["counts"]["test"] != 4


def test_an_imagefolder_with_train_and_test_folders_keeps_them(tmp_path: Path):
    root = tmp_path / "tree"
    for split, count in (("train", 6), ("test", 2)):
        for label, name in enumerate(("ant", "bee")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                value = 10 * label + (100 if split == "test" else 0) + i
                Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(
                    root / split / name / f"{i}.png")
    meta = data.prepare_dataset("imagefolder", str(root), 8, 0.34, 0.2, 0, tmp_path / "p")
    test_x, test_y = load_split(tmp_path / "p", "test")
    assert meta["class_names"] == ["ant", "bee"] and meta["counts"]["test"] == 4
    assert (np.asarray(test_x) >= 100).all() and sorted(test_y.tolist()) == [0, 0, 1, 1]
    assert (np.asarray(load_split(tmp_path / "p", "train")[0]) < 100).all()
    (root / "test" / "bee").rename(root / "test" / "wasp")
    with pytest.raises(DataError, match="not in train/: wasp; missing: bee"):
        load_source("imagefolder", str(root), 8)


def test_npz_gray_with_class_names(tmp_path: Path):
    x = np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6)
    file = _write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1]),
                      class_names=np.array(["ant", "bee", "cow"]))
    raw = load_source("npz", file, 6)
    assert raw.images.shape == (4, 6, 6, 3)
    assert all(np.array_equal(np.asarray(raw.images)[..., c], x) for c in range(3))
    assert raw.labels.dtype == np.int64 and raw.labels.tolist() == [0, 1, 2, 1]
    assert raw.class_names == ["ant", "bee", "cow"]


def test_npz_rgb_without_class_names(tmp_path: Path):
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    file = _write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 3, 2, 1], dtype=np.int32))
    raw = load_source("npz", file, 4)
    assert np.array_equal(raw.images, x)
    assert raw.class_names == ["0", "1", "2", "3"]


def test_npz_single_channel(tmp_path: Path):
    x = np.full((2, 3, 3, 1), 7, np.uint8)
    raw = load_source("npz", _write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1])), 5)
    assert raw.images.shape == (2, 5, 5, 3) and (np.asarray(raw.images) == 7).all()  # resized to 5x5


# ---------------------------------------------------------------------------------------------
# Resizing and splitting
# ---------------------------------------------------------------------------------------------

def test_resize_images():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    out = resize_images(images, 16)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(images[1]).resize((16, 16), Image.BILINEAR))
    assert np.array_equal(out[1], expected)
    assert resize_images(out, 16) is out  # already that size: no copy of a whole data set


def test_stratified_split_properties():
    labels = np.repeat(np.arange(4), [20, 40, 60, 100])
    splits = stratified_split(labels, 0.2, 0.25, seed=3)
    assert set(splits) == {"train", "val", "test"}
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    for index in splits.values():
        assert index.dtype == np.int64 and np.all(np.diff(index) > 0)
    for cls, n in enumerate([20, 40, 60, 100]):
        assert (labels[splits["test"]] == cls).sum() == round(n * 0.25)
        assert (labels[splits["val"]] == cls).sum() == round(n * 0.2)
        assert (labels[splits["train"]] == cls).sum() == n - round(n * 0.25) - round(n * 0.2)


def test_stratified_split_seeded():
    labels = np.repeat(np.arange(3), 30)
    a = stratified_split(labels, 0.2, 0.2, seed=0)
    b = stratified_split(labels, 0.2, 0.2, seed=0)
    c = stratified_split(labels, 0.2, 0.2, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_stratified_split_small_class_gets_one_each():
    labels = np.array([0, 0, 0] + [1] * 10)
    splits = stratified_split(labels, 0.1, 0.1, seed=0)
    for index in splits.values():
        assert (labels[index] == 0).sum() == 1


@pytest.mark.parametrize("count", [2, 3])
def test_too_few_images_per_class(count: int):
    # 2 images are always too few; with test 0.5 a 3-image class gets n_test = round(1.5) = 2,
    # n_val = 1 and so no training image.
    labels = np.array([0] * 20 + [1] * count)
    with pytest.raises(DataError) as info:
        stratified_split(labels, 0.45, 0.5, seed=0, class_names=["big", "tiny"])
    assert "'tiny'" in str(info.value) and f"only {count} image" in str(info.value)


def test_too_few_images_in_prepare(tmp_path: Path):
    x = np.zeros((12, 4, 4, 3), np.uint8)
    y = np.array([0] * 10 + [1] * 2)
    file = _write_npz(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["many", "few"]))
    with pytest.raises(DataError, match="'few'.*only 2 image"):
        data.prepare_dataset("npz", file, 8, 0.2, 0.2, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# prepare_dataset end to end, and atomicity
# ---------------------------------------------------------------------------------------------

def test_prepare_digits(tmp_path: Path):
    out = tmp_path / "prepared"
    meta = data.prepare_dataset("npz", str(EMBEDDED), 16, 0.15, 0.2, 7, out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + sorted(
        f"{split}_{part}.npy" for split in ("test", "train", "val") for part in ("index", "x", "y"))
    assert load_meta(out) == meta
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["source"] == "npz" and meta["path"] == str(EMBEDDED)
    assert meta["image_size"] == 16 and meta["num_classes"] == 10
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["split_seed"] == 7 and meta["val_fraction"] == 0.15
    assert meta["test_fraction"] == 0.2
    assert sum(meta["counts"].values()) == 1797
    raw = load_source("npz", str(EMBEDDED), 8)
    resized = resize_images(np.asarray(raw.images), 16)
    seen = []
    for split in ("train", "val", "test"):
        x, y = load_split(out, split)
        assert x.shape == (meta["counts"][split], 16, 16, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64
        assert np.bincount(y, minlength=10).tolist() == meta["class_counts"][split]
        index = np.load(out / f"{split}_index.npy")
        assert index.dtype == np.int64
        assert np.array_equal(x, resized[index]) and np.array_equal(y, raw.labels[index])
        seen.append(index)
    assert sorted(np.concatenate(seen).tolist()) == list(range(1797))
    assert _leftovers(tmp_path) == []


def test_prepare_writes_the_same_bytes_for_the_same_input(tmp_path: Path, monkeypatch):
    """DVC hashes the prepared files: a rerun must not change them (no time inside the files)."""
    import time
    first = data.prepare_dataset("npz", str(EMBEDDED), 8, 0.15, 0.2, 0, tmp_path / "a")
    later = time.time() + 3 * 86400  # a rerun three days later (zip stamps members with the time)
    monkeypatch.setattr(time, "time", lambda: later)
    second = data.prepare_dataset("npz", str(EMBEDDED), 8, 0.15, 0.2, 0, tmp_path / "b")
    assert first == second
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")


def test_prepare_npz_and_rerun_replaces(tmp_path: Path):
    file = _balanced_npz(tmp_path / "d.npz")
    out = tmp_path / "sub" / "prepared"        # parent created on demand
    meta = data.prepare_dataset("npz", file, 8, 0.2, 0.2, 0, out)
    assert meta["path"] == file and meta["class_names"] == ["c0", "c1", "c2"]
    assert meta["counts"] == {"train": 18, "val": 6, "test": 6}
    assert meta["class_counts"] == {"train": [6, 6, 6], "val": [2, 2, 2], "test": [2, 2, 2]}
    x, y = load_split(out, "val")
    assert x.shape == (6, 8, 8, 3) and y.tolist() == [0, 0, 1, 1, 2, 2]
    # A second run with other settings replaces the whole directory.
    (out / "stale.txt").write_text("from an older run")
    data.prepare_dataset("npz", file, 4, 0.2, 0.2, 1, out)
    assert not (out / "stale.txt").exists()
    assert load_split(out, "train")[0].shape[1:] == (4, 4, 3)
    assert _leftovers(out.parent) == []


def test_prepare_failure_leaves_old_output(tmp_path: Path):
    out = tmp_path / "prepared"
    data.prepare_dataset("npz", _balanced_npz(tmp_path / "d.npz"), 8, 0.2, 0.2, 0, out)
    before = _snapshot(out)
    with pytest.raises(DataError, match="no_such_source"):
        data.prepare_dataset("no_such_source", None, 8, 0.2, 0.2, 0, out)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_prepare_failure_while_writing_leaves_old_output(tmp_path: Path, monkeypatch):
    out = tmp_path / "prepared"
    file = _balanced_npz(tmp_path / "d.npz")
    data.prepare_dataset("npz", file, 8, 0.2, 0.2, 0, out)
    before = _snapshot(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Fails after the three .npz files were already written to the temporary directory.
    monkeypatch.setattr(data, "atomic_write_json", fail)  # meta.json, written last
    with pytest.raises(OSError, match="disk full"):
        data.prepare_dataset("npz", file, 4, 0.2, 0.2, 1, out)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_prepare_failure_during_swap_restores_old_output(tmp_path: Path, monkeypatch):
    out = tmp_path / "prepared"
    file = _balanced_npz(tmp_path / "d.npz")
    data.prepare_dataset("npz", file, 8, 0.2, 0.2, 0, out)
    before = _snapshot(out)

    real_replace = os.replace

    def fail(src, dst):  # only the final swap of the directory fails
        if Path(dst) == out:
            raise OSError("cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="cross-device"):
        data.prepare_dataset("npz", file, 4, 0.2, 0.2, 1, out)
    monkeypatch.undo()
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_prepare_refuses_foreign_directory(tmp_path: Path):
    out = tmp_path / "my_documents"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="my_documents"):
        data.prepare_dataset("npz", str(EMBEDDED), 8, 0.2, 0.2, 0, out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_load_split_missing_says_run_prepare(tmp_path: Path):
    with pytest.raises(DataError, match="prepare") as info:
        load_split(tmp_path / "nothing", "train")
    assert "train_x.npy" in str(info.value)
    with pytest.raises(DataError, match="meta.json"):
        load_meta(tmp_path / "nothing")
