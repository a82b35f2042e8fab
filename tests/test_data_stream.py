"""Prepared splits are read a batch at a time: the reader, the loader, and training through it."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anyorder.data.images import DataError
from anyorder.data.loader import batch_loader
from anyorder.data.prepared import ImageRows, load_split, split_files
from anyorder.training.loop import train_model
from anyorder.training.settings import TrainConfig

from conftest import tiny_model

CFG = TrainConfig(epochs=2, batch_size=32, lr=2e-3, shift_pixels=1, device="cpu")


def _rows(tmp_path: Path, n: int = 10, size: int = 4) -> tuple[ImageRows, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    return ImageRows(tmp_path / "x.npy"), images


def test_image_rows_index_like_the_array(tmp_path):
    rows, images = _rows(tmp_path)
    assert len(rows) == 10 and rows.shape == images.shape and rows.dtype == np.uint8
    assert np.array_equal(rows[3], images[3]) and np.array_equal(rows[-1], images[-1])
    assert np.array_equal(rows[2:7], images[2:7]) and np.array_equal(rows[::3], images[::3])
    assert rows[8:20].shape == (2, 4, 4, 3) and rows[5:5].shape == (0, 4, 4, 3)
    index = np.array([7, 1, 7, -2, 0])
    assert np.array_equal(rows[index], images[index])
    assert np.array_equal(rows[images[:, 0, 0, 0] > 128], images[images[:, 0, 0, 0] > 128])
    assert np.array_equal(np.asarray(rows), images)
    batch = rows[index]
    batch[0] = 0  # a new, writable array: the file is untouched
    assert np.array_equal(rows[7], images[7])
    for bad in (10, -11, np.array([0, 10]), np.zeros((2, 2), int), 1.5):
        with pytest.raises(IndexError):
            rows[bad]


def test_image_rows_refuse_incomplete_or_foreign_files(tmp_path):
    rows, _ = _rows(tmp_path)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-5])  # a copy that stopped early
    with pytest.raises(DataError, match="incomplete"):
        ImageRows(tmp_path / "cut.npy")
    np.save(tmp_path / "float.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        ImageRows(tmp_path / "float.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(DataError, match="not a .npy"):
        ImageRows(tmp_path / "text.npy")


def test_prepared_labels_that_do_not_match_are_refused(digits16, tmp_path):
    import shutil
    source = split_files(Path(digits16["val"][0].file).parent, "val")
    copy = split_files(tmp_path, "val")
    for part in ("x", "y"):
        shutil.copy(source[part], copy[part])
    np.save(copy["y"], np.load(copy["y"])[:-1])
    with pytest.raises(DataError, match="int64 labels"):
        load_split(tmp_path, "val")


def test_the_loader_gives_the_batches_asked_for_in_order_with_workers_or_without(digits16):
    images, labels = digits16["val"]
    batches = [np.array([5, 0, 3]), np.array([9]), np.array([1, 2, 4, 8])]
    for workers in (0, 2):
        seen = list(batch_loader(images, labels, batches, workers))
        assert len(seen) == 3
        for index, (x, y) in zip(batches, seen):
            assert x.dtype == torch.uint8 and y.dtype == torch.long
            assert np.array_equal(x.numpy(), images[index]) and np.array_equal(y.numpy(),
                                                                               labels[index])


def test_training_reads_batches_not_the_split(digits16, monkeypatch):
    """The run never holds the split: every read of the training images is at most a batch
    (or the 64-image chunks of the run's fingerprint), never all of them."""
    train, val = digits16["train"], digits16["val"]
    largest = []
    read = ImageRows._read

    def counted(self, start, count):
        if self.file == train[0].file:
            largest.append(count)
        return read(self, start, count)

    monkeypatch.setattr(ImageRows, "_read", counted)
    train_model(tiny_model("ls"), train, val, replace(CFG, epochs=1), seed=0, progress=False)
    assert max(largest) <= 64 < len(train[1])
    assert sum(c == 1 for c in largest) == len(train[1])  # the epoch's batches, image by image


def test_training_on_disk_equals_training_in_memory_with_any_number_of_workers(digits16,
                                                                              monkeypatch):
    """Reading from the prepared files, in 0 or 2 worker processes, trains the same weights as
    the same split held in memory: where batches come from changes nothing."""
    import anyorder.training.loop as loop
    images, labels = digits16["train"]
    on_disk = (images, labels)
    start = tiny_model("ls").state_dict()
    weights = []
    for data, workers in (((np.asarray(images), labels), 0), (on_disk, 0), (on_disk, 2)):
        monkeypatch.setattr(loop, "loader_workers", lambda device_type, w=workers: w)
        model = tiny_model("ls")
        model.load_state_dict(start)
        train_model(model, data, digits16["val"], CFG, seed=3, progress=False)
        weights.append(model.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


def test_images_stored_larger_are_resized_on_the_fly_for_training_evaluation_and_the_runtime(
        tmp_path):
    """data.image_size 24 with model.overrides.img_size 16: prepared once at 24 px, each batch
    resized on the device (antialiased bilinear); the exported runtime's accuracy on the same
    24 px images matches PyTorch's."""
    from anyorder.data.inputs import to_model_input
    from anyorder.data.prepare import prepare_dataset
    from anyorder.evaluation.accuracy import accuracy_for_orders
    from anyorder.export.blocks import export_model, runtime_accuracy
    from conftest import EMBEDDED
    prepare_dataset("npz", str(EMBEDDED), 24, 0.15, 0.2, 0, tmp_path / "p")
    train, val, test = (load_split(tmp_path / "p", s) for s in ("train", "val", "test"))
    assert train[0].shape[1:] == (24, 24, 3)
    model = tiny_model("sequential")  # img_size 16
    batch = to_model_input(test[0][:5], model.spec)
    direct = torch.nn.functional.interpolate(
        torch.as_tensor(test[0][:5]).permute(0, 3, 1, 2).float() / 255, size=(16, 16),
        mode="bilinear", antialias=True)
    assert batch.shape == (5, 3, 16, 16) and torch.allclose(batch, (direct - 0.5) / 0.5, atol=1e-6)
    train_model(model, train, val, replace(CFG, epochs=8, lr=3e-3), seed=0, progress=False)
    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]]
    accuracies = accuracy_for_orders(model, *test, orders)
    assert accuracies[0] > 0.4  # it learned from the resized images (chance: 0.1)
    export_model(model, tmp_path / "export", "resized")
    evaluation = {"sequential": accuracies[0], "orders": orders[1:],
                  "order_accuracies": accuracies[1:]}
    runtime = runtime_accuracy(tmp_path / "export", evaluation, *test, spec=model.spec,
                               batch_size=100)
    assert runtime["sequential"] == accuracies[0] and runtime["max_difference_points"] < 0.5
