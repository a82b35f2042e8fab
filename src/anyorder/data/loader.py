"""Training batches: a PyTorch DataLoader that reads the batches a run has drawn.

The run draws each epoch's batches itself (seeded: `anyorder.training.loop`) and hands them to
the loader's sampler (`EpochBatches`); the loader only reads them, in that order, from the
prepared images (`anyorder.data.prepared.ImageRows`, or any array in memory), in worker processes
when there are any (started once per run from a clean forkserver process, never forked from a
process that may hold threads, and kept for every epoch), into pinned memory on a GPU, a few
batches ahead. Batches stay uint8 until the device: conversion, normalisation and augmentation
happen there (`anyorder.data.inputs`). What a run computes does not depend on the number of
workers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class _IndexedBatches(Dataset):
    """Key: an int64 index array -> (uint8 images (n, S, S, 3), int64 labels (n,)) as tensors."""

    def __init__(self, images, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Indexing with an array gives a new array (numpy's, or ImageRows' reads): writable.
        images = np.ascontiguousarray(self.images[index])
        return torch.from_numpy(images), torch.as_tensor(self.labels[index], dtype=torch.long)


class EpochBatches:
    """The loader's sampler: the index arrays of the coming epoch, set by the run before it
    iterates the loader (its workers stay alive from one epoch to the next)."""

    def __init__(self, batches: Sequence[np.ndarray] = ()):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def batch_loader(images, labels: np.ndarray, batches: Sequence[np.ndarray] | EpochBatches,
                 workers: int = 0, pin_memory: bool = False, prefetch: int = 4) -> DataLoader:
    """Iterating gives (uint8 images, int64 labels) for each index array of `batches`, in order.

    workers: reading processes (0: the calling process reads); pin_memory: page-locked batches
    (a GPU copies them asynchronously); prefetch: batches each worker reads ahead."""
    if not isinstance(batches, EpochBatches):
        batches = EpochBatches(batches)
    return DataLoader(_IndexedBatches(images, labels), sampler=batches, batch_size=None,
                      num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if workers else None,
                      persistent_workers=workers > 0,
                      multiprocessing_context="forkserver" if workers else None)
