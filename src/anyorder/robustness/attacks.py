"""L-infinity FGSM and PGD on images in [0, 1], with the normalisation inside the attacked model.

The published nullspace code attacks already-normalised tensors (so its eps is not a pixel
budget); here the attacker perturbs pixels in [0, 1] and the model normalises them itself
(`PixelModel`), so eps = 8/255 means what it says on every pixel. Hand-written (a few lines each)
rather than a dependency (torchattacks pins an old `requests`). bench/attack_crosscheck.py checks
them against torchattacks installed beside the project (bit-identical adversarial images); the
test suite checks FGSM against a hand-computed step and PGD's budget and strength
(tests/test_robustness.py). A LayerShuffle model is attacked in the block order each image is
evaluated in (one order per image).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from anyorder.model.vit import AnyOrderViT
from anyorder.robustness.nullspace import frozen

ATTACKS = ("fgsm", "pgd")


class PixelModel(torch.nn.Module):
    """`model` taking images in [0, 1] (N, 3, H, W): normalises them, runs `order` (None,
    a shared order, or (N, depth) orders, one per image)."""

    def __init__(self, model: AnyOrderViT, order: Optional[torch.Tensor] = None):
        super().__init__()
        self.model, self.order = model, order
        self.register_buffer("mean", torch.tensor(model.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.spec.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean.to(images)) / self.std.to(images), self.order)


def check_eps(eps: float, key: str = "eps") -> None:
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{key}: an L-infinity budget on images in [0, 1] must be in [0, 1], got "
                         f"{eps!r} (8/255 = {8 / 255:.5f})")


def _input_gradient(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
                    ) -> torch.Tensor:
    images = images.detach().requires_grad_(True)
    loss = F.cross_entropy(model(images).float(), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [images])
    return grad


def fgsm(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float
         ) -> torch.Tensor:
    """x + eps * sign(grad_x CE), clipped to [0, 1]. Weights are frozen while attacking."""
    check_eps(eps)
    with frozen(model):
        grad = _input_gradient(model, images, labels)
    return (images + eps * grad.sign()).clamp(0, 1).detach()


def pgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
        steps: int = 10, step_size: Optional[float] = None, random_start: bool = True,
        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Madry's PGD: `steps` signed-gradient steps of `step_size` (default 2.5 * eps / steps),
    each projected back onto the eps ball around `images` and onto [0, 1]; a uniform random
    start inside the ball with `random_start`."""
    check_eps(eps)
    if steps < 1:
        raise ValueError(f"pgd steps must be >= 1, got {steps}")
    alpha = 2.5 * eps / steps if step_size is None else step_size
    adv = images.detach().clone()
    if random_start and eps > 0:
        noise = torch.rand(images.shape, generator=generator).to(images) * 2 - 1
        adv = (adv + eps * noise).clamp(0, 1)
    with frozen(model):
        for _ in range(steps):
            grad = _input_gradient(model, adv, labels)
            adv = adv + alpha * grad.sign()
            adv = torch.min(torch.max(adv, images - eps), images + eps).clamp(0, 1).detach()
    return adv


def attack(name: str, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
           eps: float, steps: int = 10, step_size_factor: float = 2.5, random_start: bool = True,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adversarial images by attack `name` (fgsm | pgd); PGD's step is factor * eps / steps."""
    if name == "fgsm":
        return fgsm(model, images, labels, eps)
    if name == "pgd":
        return pgd(model, images, labels, eps, steps, step_size_factor * eps / steps,
                   random_start, generator)
    raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
