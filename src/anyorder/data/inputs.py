"""Turning stored uint8 images into model inputs: normalisation and the random-shift augmentation."""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from anyorder.model.spec import ModelSpec


def to_model_input(images: np.ndarray | torch.Tensor, spec: ModelSpec,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N,H,W,3) -> float32 (N,3,S,S), scaled to [0,1] and normalised as `spec` says.
    The copy to the device is asynchronous from pinned memory (a DataLoader's batches on a GPU).
    Images stored at another size than the model's (data.image_size against model.overrides.
    img_size) are resized here, on the device: bilinear with antialiasing, as Pillow's resize at
    `prepare` (the two differ in rounding; images of the model's size are untouched)."""
    if not isinstance(images, torch.Tensor):
        images = np.asarray(images)  # an array, or prepared images read from disk (ImageRows)
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if batch.shape[-2:] != (spec.img_size, spec.img_size):
        batch = torch.nn.functional.interpolate(batch, size=(spec.img_size, spec.img_size),
                                                mode="bilinear", antialias=True,
                                                align_corners=False)
    mean, std = _normalisation(tuple(spec.mean), tuple(spec.std), batch.device)
    return (batch - mean) / std


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """(mean, std) as (1,3,1,1) tensors on `device`, made once: a new host-to-device copy per
    batch would make every training step on a GPU wait for the copy."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def random_shift(batch: torch.Tensor, pixels: int, generator: torch.Generator,
                 total: Optional[int] = None, part: slice = slice(None)) -> torch.Tensor:
    """Shift every image (N,C,H,W) by its own random offset in [-pixels, pixels] (pad with the
    image's own minimum, crop). Offsets are drawn for `total` images (default N) and `part` of
    them used: a process holding one shard of a global batch shifts it as one process would."""
    if pixels <= 0:
        return batch
    n, c, h, w = batch.shape
    offsets = torch.randint(0, 2 * pixels + 1, (2, n if total is None else total),
                            generator=generator)[:, part] - pixels
    # Each image's minimum fills what its shift uncovers (computed on the device: no step waits
    # to read it), so the fill does not depend on which other images share the batch. One fill
    # and one window copy per image: this is memory-bound, and fewer passes are faster.
    out = batch.amin(dim=(1, 2, 3), keepdim=True).expand(n, c, h, w).clone()
    for i, (dy, dx) in enumerate(offsets.t().tolist()):
        out[i, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            batch[i, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out
