"""The 15 ImageNet-C corruptions at 5 severities, with the parameters of CIFAR-10-C (Hendrycks &
Dietterich 2019, the version of ImageNet-C made for 32x32 images), vectorised over a batch.

Why not a library: `imagecorruptions` (the maintained packaging of ImageNet-C, last release 2020)
no longer imports on this stack (it needs `pkg_resources`, gone from current setuptools), pulls in
OpenCV and scikit-image, and carries ImageNet's 224-pixel parameters (its blur radii alone wipe out
a 32x32 image). Here: numpy, torch and Pillow only, so it runs wherever the library does.

Adaptations, all stated:
- pixel-sized parameters (blur radii, the glass-blur shuffle distance) are CIFAR-10-C's at 32
  pixels and grow with larger images (x image_size / 32; smaller images keep CIFAR-10-C's values,
  or the blurs would vanish); elastic parameters are fractions of the image size as in CIFAR-10-C;
- ImageNet-C's frost overlays photographs of frost that are not redistributed with this project;
  a procedural frost texture (bright crystal streaks on a hazy layer) takes their place, blended
  with CIFAR-10-C's weights;
- ImageMagick's motion blur (snow, motion blur) is a one-sided Gaussian line kernel here.
Every corruption is deterministic for (seed, name, severity): the same images come out on any
machine with the same numpy, torch and Pillow.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anyorder.robustness.corruption_names import CORRUPTIONS, SEVERITIES


# -- tensor helpers (float images in [0, 1], (N, 3, H, W)) -----------------------------------------

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), reflected borders."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel1d(sigma)
    n, c, h, w = x.shape
    r = min(len(k) // 2, h - 1, w - 1)
    k = k[len(k) // 2 - r:len(k) // 2 + r + 1]
    k = k / k.sum()
    flat = x.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return flat.view(n, c, h, w)


def _filter_per_image(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve image i (all channels) with kernels[i] ((N, k, k), odd k), reflected borders."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    r = k // 2
    pad = min(r, h - 1, w - 1)
    padded = F.pad(x.reshape(1, n * c, h, w), (pad,) * 4, mode="reflect")
    if pad < r:  # tiny images: zero-pad the rest (the kernel's tail there is small)
        padded = F.pad(padded, (r - pad,) * 4)
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k)
    return F.conv2d(padded, weight.flip(-1, -2), groups=n * c).view(n, c, h, w)


def _disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    size = max(3, 2 * int(math.ceil(radius)) + 1)
    t = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    disk = _gaussian_blur(F.pad(disk[None, None], (2, 2, 2, 2)), alias_blur)[0, 0]
    return disk / disk.sum()


def _motion_kernels(radius: float, sigma: float, angles_deg: np.ndarray) -> torch.Tensor:
    """One-sided Gaussian line kernels ((N, k, k)), one per angle (ImageMagick's motion blur)."""
    r = max(1, int(math.ceil(radius)))
    size = 2 * r + 1
    steps = torch.arange(0, r + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (steps / max(sigma, 1e-3)) ** 2)
    kernels = torch.zeros(len(angles_deg), size, size)
    for i, angle in enumerate(np.deg2rad(angles_deg)):
        xs, ys = r + steps * math.cos(angle), r - steps * math.sin(angle)
        x0, y0 = xs.floor().long().clamp(0, size - 1), ys.floor().long().clamp(0, size - 1)
        x1, y1 = (x0 + 1).clamp(max=size - 1), (y0 + 1).clamp(max=size - 1)
        fx, fy = xs - xs.floor(), ys - ys.floor()
        for yy, xx, part in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x1, fx * (1 - fy)),
                             (y1, x0, (1 - fx) * fy), (y1, x1, fx * fy)):
            kernels[i].index_put_((yy, xx), weights * part, accumulate=True)
        kernels[i] /= kernels[i].sum()
    return kernels


def _center_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by `factor` (>= 1), keeping the size (bilinear)."""
    n, c, h, w = x.shape
    zoomed = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    top, left = (zoomed.shape[2] - h) // 2, (zoomed.shape[3] - w) // 2
    return zoomed[:, :, top:top + h, left:left + w]


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal in [0, 1] ((size, size), size a power of 2), as ImageNet-C's fog."""
    grid = np.zeros((size, size))
    step, scale = size, 100.0
    grid[0, 0] = 0.0
    while step >= 2:
        half = step // 2
        # squares: the mean of the 4 corners plus noise at each square's centre
        corners = grid[0:size:step, 0:size:step]
        mean = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1)
                + np.roll(np.roll(corners, -1, 0), -1, 1)) / 4
        grid[half:size:step, half:size:step] = mean + rng.uniform(-scale, scale, mean.shape)
        # diamonds: the mean of 4 neighbours plus noise at each edge midpoint
        for rows, cols in ((slice(0, size, step), slice(half, size, step)),
                           (slice(half, size, step), slice(0, size, step))):
            r_idx = np.arange(size)[rows][:, None]
            c_idx = np.arange(size)[cols][None, :]
            neighbours = (grid[(r_idx - half) % size, c_idx] + grid[(r_idx + half) % size, c_idx]
                          + grid[r_idx, (c_idx - half) % size] + grid[r_idx, (c_idx + half) % size])
            grid[rows, cols] = neighbours / 4 + rng.uniform(-scale, scale, neighbours.shape)
        step, scale = half, scale / decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    v, delta = maxc, maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (r, g, b) in enumerate(choices):
        mask = (i == k).unsqueeze(1)
        out = torch.where(mask, torch.stack([r, g, b], dim=1), out)
    return out


# -- the corruptions: (x float (N,3,H,W) in [0,1], severity, rng, scale) -> corrupted ------------

def _gaussian_noise(x, s, rng, scale):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return x + torch.from_numpy(rng.normal(0.0, c, x.shape)).float()


def _shot_noise(x, s, rng, scale):
    c = [500, 250, 100, 75, 50][s - 1]
    return torch.from_numpy(rng.poisson(x.double().numpy() * c) / c).float()


def _impulse_noise(x, s, rng, scale):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.numpy().copy()
    out[hit & salt], out[hit & ~salt] = 1.0, 0.0
    return torch.from_numpy(out)


def _defocus_blur(x, s, rng, scale):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    kernel = _disk_kernel(radius * scale, alias * scale)
    return _filter_per_image(x, kernel.expand(len(x), -1, -1))


def _glass_blur(x, s, rng, scale):
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
                                (0.4, 1, 2)][s - 1]
    delta = max(1, int(round(delta * scale)))
    x = _gaussian_blur(x, sigma * scale).clone()
    n, _, h, w = x.shape
    rows = torch.arange(n)
    for _ in range(iterations):  # local pixel shuffling, as ImageNet-C (sequential by design)
        for i in range(h - delta - 1, delta - 1, -1):
            for j in range(w - delta - 1, delta - 1, -1):
                d = torch.from_numpy(rng.integers(-delta, delta, size=(n, 2), endpoint=False))
                i2, j2 = i + d[:, 1], j + d[:, 0]
                here, there = x[rows, :, i, j].clone(), x[rows, :, i2, j2].clone()
                x[rows, :, i, j], x[rows, :, i2, j2] = there, here
    return _gaussian_blur(x, sigma * scale)


def _motion_blur(x, s, rng, scale):
    radius, sigma = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][s - 1]
    angles = rng.uniform(-45, 45, len(x))
    return _filter_per_image(x, _motion_kernels(radius * scale, sigma * scale, angles))


def _zoom_blur(x, s, rng, scale):
    # CIFAR-10-C: (x + sum over the zooms, 1.00 included) / (zooms + 1): the unzoomed image
    # counts twice, once as itself and once as the 1.00 zoom.
    top = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    factors = np.arange(1, top, 0.01)
    out = 2 * x
    for factor in factors[1:]:
        out += _center_zoom(x, float(factor))
    return out / (len(factors) + 1)


def _snow(x, s, rng, scale):
    loc, spread, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    n, _, h, w = x.shape
    layer = torch.from_numpy(rng.normal(loc, spread, (n, 1, h, w))).float()
    layer = _center_zoom(layer, zoom) if zoom > 1 else layer
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    angles = rng.uniform(-135, -45, n)
    layer = _filter_per_image(layer, _motion_kernels(radius * scale, sigma * scale, angles))
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = blend * x + (1 - blend) * torch.maximum(x, gray * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def _frost_texture(n: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """Procedural frost (N, 3, H, W) in [0, 1]: short bright crystal streaks on a hazy layer."""
    streaks = np.zeros((n, h, w))
    count = max(1, h * w // 6)
    for i in range(n):
        ys, xs = rng.uniform(0, h, count), rng.uniform(0, w, count)
        angles, lengths = rng.uniform(0, np.pi, count), rng.uniform(1, 4, count) * h / 32
        brightness = rng.uniform(0.4, 1.0, count)
        for t in np.linspace(0, 1, 6):
            yy = np.clip((ys + t * lengths * np.sin(angles)).astype(int), 0, h - 1)
            xx = np.clip((xs + t * lengths * np.cos(angles)).astype(int), 0, w - 1)
            np.maximum.at(streaks[i], (yy, xx), brightness)
    haze = torch.from_numpy(rng.random((n, 1, h, w))).float()
    haze = _gaussian_blur(haze, 2.0 * h / 32)
    haze = (haze - haze.amin((2, 3), keepdim=True)) / (
        haze.amax((2, 3), keepdim=True) - haze.amin((2, 3), keepdim=True) + 1e-12)
    texture = 0.6 * torch.from_numpy(streaks).float().unsqueeze(1) + 0.5 * haze
    texture = _gaussian_blur(texture, 0.5).clamp(0, 1)
    tint = torch.tensor([0.92, 0.96, 1.0]).view(1, 3, 1, 1)  # frost is slightly blue
    return texture * tint


def _frost(x, s, rng, scale):
    image_weight, frost_weight = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    n, _, h, w = x.shape
    return image_weight * x + frost_weight * _frost_texture(n, h, w, rng)


def _fog(x, s, rng, scale):
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    n, _, h, w = x.shape
    size = 2 ** int(math.ceil(math.log2(max(h, w, 2))))
    fog = np.stack([_plasma_fractal(size, decay, rng)[:h, :w] for _ in range(n)])
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + strength * torch.from_numpy(fog).float().unsqueeze(1)
    return x * peak / (peak + strength)


def _brightness(x, s, rng, scale):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    hsv = _rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return _hsv_to_rgb(hsv)


def _contrast(x, s, rng, scale):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)  # per channel, as CIFAR-10-C
    return (x - mean) * c + mean


def _elastic_transform(x, s, rng, scale):
    n, _, h, w = x.shape
    alpha, sigma, affine = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                            (0.1, 0.03, 0.03)][s - 1]
    alpha, sigma, affine = alpha * h, sigma * h, affine * h
    # Random affine map from three jittered points around the centre (as cv2.getAffineTransform).
    centre = np.array([w / 2, h / 2])
    square = min(h, w) // 3
    src = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    grids = []
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    for _ in range(n):
        dst = src + rng.uniform(-affine, affine, src.shape)
        # inverse map: for each output pixel, where it comes from (dst -> src)
        a = np.linalg.solve(np.c_[dst, np.ones(3)], src).T  # (2, 3)
        sx = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
        sy = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
        dx = torch.from_numpy(rng.uniform(-1, 1, (1, 1, h, w))).float()
        dy = torch.from_numpy(rng.uniform(-1, 1, (1, 1, h, w))).float()
        if sigma > 0:
            dx, dy = _gaussian_blur(dx, sigma), _gaussian_blur(dy, sigma)
        sx = sx + alpha * dx[0, 0].double()
        sy = sy + alpha * dy[0, 0].double()
        grids.append(torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], dim=-1))
    grid = torch.stack(grids).float()
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def _pixelate(x, s, rng, scale):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    images = _to_uint8(x)
    h, w = images.shape[1:3]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    out = [np.asarray(Image.fromarray(im).resize(small, Image.BOX).resize((w, h), Image.BOX))
           for im in images]
    return _to_tensor(np.stack(out))


def _jpeg_compression(x, s, rng, scale):
    quality = [80, 65, 58, 50, 40][s - 1]
    out = []
    for im in _to_uint8(x):
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return _to_tensor(np.stack(out))


_FUNCTIONS: dict[str, Callable] = {name: globals()[f"_{name}"] for name in CORRUPTIONS}


def check_names(names, key: str = "robustness.corruptions.names") -> None:
    """ValueError naming `key` for a corruption name that does not exist."""
    unknown = [n for n in names if n not in _FUNCTIONS]
    if unknown:
        raise ValueError(f"{key}: unknown corruption {unknown[0]!r}; known: {', '.join(CORRUPTIONS)}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, 3) with `name` at `severity` (1..5); uint8 out.
    Deterministic for (seed, name, severity) and the images."""
    check_names([name], "corruption")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, CORRUPTIONS.index(name), severity])
    scale = max(1.0, images.shape[1] / 32.0)  # never below CIFAR-10-C's own sizes
    with torch.no_grad():
        out = _FUNCTIONS[name](_to_tensor(images), severity, rng, scale)
    return _to_uint8(out)


def corrupt_severities(images: np.ndarray, name: str, severities, seed: int = 0) -> np.ndarray:
    """`images` corrupted with `name` at each of `severities`, stacked: uint8 (S, N, H, W, 3)."""
    return np.stack([corrupt(images, name, s, seed) for s in severities])
