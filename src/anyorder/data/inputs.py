"""Turning stored uint8 images into model inputs: normalisation and the random-shift augmentation."""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from anyorder.model.spec import ModelSpec


def to_model_input(images: np.ndarray | torch.Tensor, spec: ModelSpec,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N,H,W,3) -> float32 (N,3,H,W), scaled to [0,1] and normalised as `spec` says."""
    batch = torch.as_tensor(images).to(device)
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = _normalisation(tuple(spec.mean), tuple(spec.std), batch.device)
    return (batch - mean) / std


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """(mean, std) as (1,3,1,1) tensors on `device`, made once: a new host-to-device copy per
    batch would make every training step on a GPU wait for the copy."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def random_shift(batch: torch.Tensor, pixels: int, generator: torch.Generator,
                 fill: Optional[float] = None) -> torch.Tensor:
    """Shift every image (N,C,H,W) by its own random offset in [-pixels, pixels] (pad and crop)."""
    if pixels <= 0:
        return batch
    n, c, h, w = batch.shape
    if fill is None:  # the batch's minimum, kept on the device (no step waits to read it)
        padded = torch.nn.functional.pad(batch, (pixels,) * 4)
        inside = torch.zeros(padded.shape[-2:], dtype=torch.bool, device=batch.device)
        inside[pixels:pixels + h, pixels:pixels + w] = True
        padded = torch.where(inside, padded, batch.amin())
    else:
        padded = torch.nn.functional.pad(batch, (pixels,) * 4, value=fill)
    offsets = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator).to(batch.device)
    rows = offsets[0][:, None] + torch.arange(h, device=batch.device)[None]
    cols = offsets[1][:, None] + torch.arange(w, device=batch.device)[None]
    index_n = torch.arange(n, device=batch.device)[:, None, None, None]
    index_c = torch.arange(c, device=batch.device)[None, :, None, None]
    return padded[index_n, index_c, rows[:, None, :, None], cols[:, None, None, :]]
