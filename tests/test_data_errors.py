"""Bad data sets refused by name before anything is written: unknown sources, missing paths,
empty or unreadable ImageFolder trees, malformed npz archives, impossible split fractions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from anyorder.data import prepare as data
from anyorder.data.images import DataError
from anyorder.data.sources import SOURCES, load_source
from anyorder.data.splits import stratified_split
from data_fixtures import _write_npz, _leftovers, image_folder  # noqa: F401  (fixtures)


# ---------------------------------------------------------------------------------------------
# Bad input: DataError naming the offending file, path or class
# ---------------------------------------------------------------------------------------------

def test_unknown_source_lists_known():
    with pytest.raises(DataError) as info:
        load_source("mnist", None, 8)
    message = str(info.value)
    assert "mnist" in message
    assert all(name in message for name in SOURCES)


@pytest.mark.parametrize("source", ["cifar10", "cifar100", "imagefolder", "npz"])
def test_missing_path(tmp_path: Path, source: str):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataError, match="does_not_exist"):
        load_source(source, str(missing), 8)


@pytest.mark.parametrize("source", ["cifar10", "cifar100", "imagefolder", "npz"])
def test_path_not_set(source: str):
    with pytest.raises(DataError, match="needs a path"):
        load_source(source, None, 8)


def test_imagefolder_empty_class(image_folder: Path):
    (image_folder / "emu").mkdir()
    (image_folder / "emu" / "readme.txt").write_text("no pictures yet")
    with pytest.raises(DataError, match="class folder 'emu' has no images"):
        load_source("imagefolder", str(image_folder), 8)


def test_imagefolder_no_class_folders(tmp_path: Path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="flat.*no class sub-folders"):
        load_source("imagefolder", str(tmp_path / "flat"), 8)


def test_imagefolder_not_a_directory(tmp_path: Path):
    file = tmp_path / "a_file.png"
    file.write_bytes(b"x")
    with pytest.raises(DataError, match="a_file.png"):
        load_source("imagefolder", str(file), 8)


def test_imagefolder_unreadable_image(image_folder: Path, tmp_path: Path):
    """Images are decoded as prepare writes them: a broken one stops it, naming the file, and
    nothing is written."""
    for name in ("cat", "dog"):  # enough images per class for train, val and test
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(image_folder / name / f"x{i}.png")
    (image_folder / "dog" / "broken.png").write_bytes(b"\x89PNG this is not really a png")
    with pytest.raises(DataError, match="broken.png"):
        data.prepare_dataset("imagefolder", str(image_folder), 8, 0.2, 0.2, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imagefolder_unreadable_subfolder_is_named_and_nothing_written(image_folder: Path,
                                                                       tmp_path: Path, monkeypatch):
    """pathlib's rglob skips a folder it cannot list without a word: a class would silently
    lose images. (Tests run as root, where chmod does not stop reading: the denial is simulated
    where the operating system reports it, in os.scandir.)"""
    locked = image_folder / "dog" / "private"
    locked.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(locked / "secret.png")
    out = tmp_path / "prepared"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"private: cannot list this folder \(Permission denied\)"):
        data.prepare_dataset("imagefolder", str(image_folder), 8, 0.2, 0.2, 0, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_imagefolder_memory_follows_the_output_not_the_photos(tmp_path: Path, monkeypatch):
    """Large photos are decoded and shrunk one at a time, never held at full size together."""
    import tracemalloc
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "big" / name).mkdir(parents=True)
        for i in range(6):  # 12 photos of 1200 x 900: 3.2 MB each decoded, 39 MB together
            photo = rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)
            Image.fromarray(photo).save(tmp_path / "big" / name / f"{i}.jpg", quality=80)
    decoded = []  # the size each photo is decoded at, before the final resize
    real_transpose = ImageOps.exif_transpose

    def record(image, *args, **kwargs):
        decoded.append(image.size)
        return real_transpose(image, *args, **kwargs)

    monkeypatch.setattr(ImageOps, "exif_transpose", record)
    tracemalloc.start()
    try:
        raw = load_source("imagefolder", str(tmp_path / "big"), 16)
        images = np.asarray(raw.images)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert images.shape == (12, 16, 16, 3)
    assert peak < 3_000_000, f"peak {peak / 1e6:.1f} MB: a full-size photo was held as an array"
    # JPEG decoding at 1/8 scale: Pillow itself never held a full 1200 x 900 picture either.
    assert decoded == [(150, 113)] * 12


def test_imagefolder_single_class_rejected_by_prepare(tmp_path: Path):
    (tmp_path / "only" / "one").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "only" / "one" / "a.png")
    with pytest.raises(DataError, match="at least 2"):
        data.prepare_dataset("imagefolder", str(tmp_path / "only"), 8, 0.2, 0.2, 0,
                             tmp_path / "out")


def test_npz_label_out_of_range(tmp_path: Path):
    file = _write_npz(tmp_path / "bad_labels.npz", x=np.zeros((3, 4, 4), np.uint8),
                      y=np.array([0, 1, 5]), class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"bad_labels\.npz.*label 5"):
        load_source("npz", file, 8)


def test_npz_negative_label(tmp_path: Path):
    file = _write_npz(tmp_path / "neg.npz", x=np.zeros((3, 4, 4), np.uint8),
                      y=np.array([0, -2, 1]))
    with pytest.raises(DataError, match=r"neg\.npz.*label -2"):
        load_source("npz", file, 8)


def test_npz_length_mismatch(tmp_path: Path):
    file = _write_npz(tmp_path / "mismatch.npz", x=np.zeros((5, 4, 4), np.uint8),
                      y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"mismatch\.npz.*5 images.*3 labels"):
        load_source("npz", file, 8)


def test_npz_wrong_dtype(tmp_path: Path):
    file = _write_npz(tmp_path / "floaty.npz", x=np.zeros((3, 4, 4, 3), np.float32),
                      y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"floaty\.npz.*float32.*astype\(np\.uint8\)"):
        load_source("npz", file, 8)


def test_npz_float_labels(tmp_path: Path):
    file = _write_npz(tmp_path / "flabels.npz", x=np.zeros((3, 4, 4), np.uint8),
                      y=np.array([0.0, 1.0, 0.0]))
    with pytest.raises(DataError, match=r"flabels\.npz.*integer"):
        load_source("npz", file, 8)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 4, 2), (3, 4, 4, 3, 1)])
def test_npz_wrong_shape(tmp_path: Path, shape):
    file = _write_npz(tmp_path / "shape.npz", x=np.zeros(shape, np.uint8), y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"shape\.npz"):
        load_source("npz", file, 8)


@pytest.mark.parametrize("missing", ["x", "y"])
def test_npz_missing_key(tmp_path: Path, missing: str):
    arrays = {"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 1])}
    del arrays[missing]
    file = _write_npz(tmp_path / "partial.npz", **arrays)
    with pytest.raises(DataError, match=rf"partial\.npz.*missing array '{missing}'"):
        load_source("npz", file, 8)


def test_npz_not_an_archive(tmp_path: Path):
    file = tmp_path / "junk.npz"
    file.write_bytes(b"definitely not a zip")
    with pytest.raises(DataError, match=r"junk\.npz"):
        load_source("npz", str(file), 8)


def test_npz_empty_class_named(tmp_path: Path):
    file = _write_npz(tmp_path / "gap.npz", x=np.zeros((4, 4, 4), np.uint8),
                      y=np.array([0, 0, 2, 2]), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"gap\.npz.*class 1 \('b'\) has no images"):
        data.prepare_dataset("npz", file, 8, 0.2, 0.2, 0, tmp_path / "out")


@pytest.mark.parametrize("val, test", [(0.0, 0.2), (0.2, 1.0), (0.5, 0.5)])
def test_bad_fractions(val: float, test: float):
    with pytest.raises(DataError, match="fraction"):
        stratified_split(np.repeat(np.arange(2), 10), val, test, seed=0)


def test_imagefolder_file_order_is_pathlibs(tmp_path: Path):
    """Files are listed compactly (relative names, not Paths) in the order sorted Paths had:
    folder by folder, so 'sub/x.png' comes before 'sub-2/a.png' (plain string order would not)."""
    from anyorder.data.imagefolder import _image_files
    names = ["b.png", "a.PNG", "Z.jpg", "sub/x.png", "sub-2/a.png", "sub/deeper/c.png",
             "c.png.d/e.png", "c.png", ".hidden.png", "sub/.x/y.png", "notes.txt"]
    for name in names:
        (tmp_path / "cls" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cls" / name).write_bytes(b"")
    expected = sorted(p for p in (tmp_path / "cls").rglob("*")
                      if p.is_file() and p.suffix.lower() in (".png", ".jpg")
                      and not any(part.startswith(".") for part in p.relative_to(tmp_path).parts))
    relative = [str(p.relative_to(tmp_path / "cls")) for p in expected]
    assert _image_files(tmp_path / "cls") == relative
    assert relative.index("sub/x.png") < relative.index("sub-2/a.png")
    assert sorted(relative) != relative  # string order would differ: the test can fail
