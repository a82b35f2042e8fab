"""What a request to the service carries, checked: its options (query or v2 request parameters),
its PNG/JPEG uploads, the `images` tensor of a v2 request; and the limits the service holds
requests to."""

import io
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from anyorder.errors import InputError
from anyorder.export.runtime import ExportError, Policy, parse_indices
from anyorder.serving import protocol
from anyorder.serving.router import DYNAMIC_ORDERS

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096  # per uploaded image, checked from its header before decoding


class ImageError(InputError):
    """An upload that is not a usable image for this model (HTTP 415 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    max_images: int = 64
    default_deadline_s: float = 10.0
    max_deadline_s: float = 60.0


@dataclass
class Options:
    order: Union[str, list] = "sequential"
    seed: Optional[int] = None
    policy: Policy = Policy()
    exclude: tuple = ()
    deadline_s: float = 10.0
    resize: bool = False

    @classmethod
    def parse(cls, values: dict, limits: Limits) -> "Options":
        """Query or request parameters -> Options; ExportError naming a bad one."""
        known = {"order", "seed", "policy", "exclude", "deadline_ms", "resize"}
        unknown = sorted(set(values) - known - {"binary_data_output"})
        if unknown:
            raise ExportError(f"unknown option(s) {unknown}; the options are {sorted(known)}")
        order = str(values.get("order", "sequential"))
        if order not in ("sequential", "random", *DYNAMIC_ORDERS):
            order = parse_indices(order, "order (sequential, random, any, fastest or block "
                                         "indices)")
        seed = values.get("seed")
        try:
            seed = None if seed in (None, "") else int(seed)
            deadline_ms = float(values.get("deadline_ms", limits.default_deadline_s * 1e3))
        except (TypeError, ValueError):
            raise ExportError(f"seed {values.get('seed')!r} / deadline_ms "
                              f"{values.get('deadline_ms')!r}: must be numbers") from None
        if not 0 < deadline_ms <= limits.max_deadline_s * 1e3:
            raise ExportError(f"deadline_ms {deadline_ms:g}: must be in (0, "
                              f"{limits.max_deadline_s * 1e3:g}]")
        resize = str(values.get("resize", "false")).lower()
        if resize not in ("true", "false", "1", "0"):
            raise ExportError(f"resize {values.get('resize')!r}: true or false")
        return cls(order, seed, Policy.parse(values.get("policy", "skip")),
                   tuple(parse_indices(values.get("exclude", ""), "exclude")),
                   deadline_ms / 1e3, resize in ("true", "1"))


def decode_image(data: bytes, name: str, size: int, resize: bool) -> np.ndarray:
    """One PNG/JPEG upload -> uint8 (size, size, 3); ImageError saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{name}: not an image PNG or JPEG could decode", 415) from None
    if image.format not in IMAGE_FORMATS:
        raise ImageError(f"{name}: a {image.format} image; send PNG or JPEG", 415)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} pixels is more than {MAX_PIXELS}; send "
                         f"{size}x{size} images", 413)
    bands = image.getbands()
    if image.mode != "RGB":
        raise ImageError(f"{name}: mode {image.mode} ({len(bands)} channel(s)); the model takes "
                         f"RGB images (3 channels): convert it to RGB first")
    if (width, height) != (size, size) and not resize:
        raise ImageError(f"{name}: {width}x{height} pixels, the model takes {size}x{size}; "
                         f"resize it, or pass resize=true to let the service do it")
    try:
        if (width, height) != (size, size):
            image.draft("RGB", (size, size))
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)  # RGB, checked above
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: the image data is damaged ({exc})") from None


def tensor_images(manifest: dict, tensors: dict, max_images: int, preprocess) -> np.ndarray:
    """The `images` input of a v2 request -> normalised float32 (N, 3, H, W); `preprocess`
    normalises uint8 images (the backend's runtime's)."""
    size = int(manifest["image_size"])
    if set(tensors) != {"images"}:
        raise protocol.ProtocolError(f"inputs {sorted(tensors)}: send one input named images, "
                                     f"UINT8 (N, {size}, {size}, 3) or FP32 (N, 3, {size}, "
                                     f"{size}) normalised")
    images = tensors["images"]
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (size, size, 3):
        batch = preprocess(images)
    elif images.dtype == np.float32 and images.ndim == 4 and images.shape[1:] == (3, size, size):
        batch = images
    else:
        raise protocol.ProtocolError(
            f"images: {protocol.datatype_of(images)} {list(images.shape)}; send UINT8 (N, {size},"
            f" {size}, 3) RGB or FP32 (N, 3, {size}, {size}) normalised")
    if not 1 <= len(batch) <= max_images:
        raise protocol.ProtocolError(f"images: {len(batch)} images; send 1..{max_images} per "
                                     f"request")
    return batch
