"""Image files and image arrays: which files count as images, reading one at a given size,
resizing many; and `DataError`, the error for any bad input data.

Only numpy, Pillow and the standard library are imported here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anyorder.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(InputError):
    """Bad input data. The message names the file, path or class at fault and how to fix it."""


def read_image(file: str | Path, size: int, resize: bool = True) -> np.ndarray:
    """One image file -> uint8 (size, size, 3), decoded and resized on its own (bilinear).
    resize=False: an image of another size is refused (DataError naming it) instead."""
    try:
        with Image.open(file) as im:
            if not resize and im.size != (size, size):
                raise DataError(f"{file}: {im.size[0]}x{im.size[1]} pixels, the model takes "
                                f"{size}x{size}; resize it (the CLI's --resize does)")
            # JPEG can decode at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo never sits in
            # memory at full size when a 32x32 image is wanted.
            im.draft("RGB", (size, size))
            # Honour the EXIF orientation so camera photos are not sideways.
            im = ImageOps.exif_transpose(im).convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{file}: cannot read this image ({exc}); delete or replace the file"
                        ) from exc


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3) by PIL bilinear (`images` itself if they
    already have that size)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"resize_images needs uint8 (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    if size < 1:
        raise DataError(f"image size must be >= 1, got {size}")
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return out
