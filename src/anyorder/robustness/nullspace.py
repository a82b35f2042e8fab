"""Nullspace noise (spec section 2): the exact nullspace of the patch embedding, and the
approximate (encoder-level) nullspace noise that nullspace fine-tuning trains against.

Exact: the patch embedding is one linear map W (D x C*P*P) applied to every flattened patch of the
*normalised* image. Any v with W v = 0, added patch-wise to the input, leaves every patch token,
hence the whole network's output, unchanged up to float round-off. The basis comes from an SVD of
the full W (not per colour channel, as the published code does).

Approximate: one noise tensor v (num_patches x D) added to the patch tokens right after the patch
embedding, found by gradient descent on v alone (the model is frozen: no weight ever receives a
gradient, unlike the published code), from a large uniform start, stopping as soon as the softmax
outputs barely move (mean squared L2 distance < epsilon). LayerShuffle models are synthesised and
checked under a fresh random block order at every step.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from anyorder.errors import RunFailed
from anyorder.model.vit import AnyOrderViT
from anyorder.data.inputs import to_model_input
from anyorder.robustness.settings import SynthesisConfig

NOISE_KINDS = ("nullspace", "random", "none")


# -- exact nullspace of the patch embedding ------------------------------------------------------

@dataclass
class ExactNullspace:
    basis: torch.Tensor        # (C*P*P, k) float64, orthonormal columns spanning ker(W)
    rank: int                  # rank of W at `tolerance`
    input_dim: int             # C*P*P
    embed_dim: int             # D
    tolerance: float           # singular values <= this count as zero
    singular_values: list[float]

    @property
    def dimension(self) -> int:
        return int(self.basis.shape[1])

    def summary(self) -> dict:
        s = self.singular_values
        return {"dimension": self.dimension, "rank": self.rank, "input_dim": self.input_dim,
                "embed_dim": self.embed_dim, "tolerance": self.tolerance,
                "largest_singular_value": max(s) if s else 0.0,
                "smallest_kept_singular_value": min((v for v in s if v > self.tolerance),
                                                    default=0.0)}


def patch_embedding_matrix(model: AnyOrderViT) -> torch.Tensor:
    """W (D, C*P*P): the patch embedding's convolution as the matrix applied to each patch,
    columns in (channel, row, column) order, as `Tensor.flatten` of a (C, P, P) patch gives."""
    proj = model.vit.patch_embed.proj
    if not isinstance(proj, torch.nn.Conv2d) or proj.kernel_size != proj.stride:
        raise ValueError("the exact nullspace needs a non-overlapping patch embedding (a Conv2d "
                         "whose kernel equals its stride), as every timm ViT has")
    return proj.weight.detach().flatten(1)


def exact_nullspace(model: AnyOrderViT, rtol: Optional[float] = None) -> ExactNullspace:
    """Orthonormal basis of ker(W) by an SVD of the whole matrix, in float64.

    Rank tolerance as numpy.linalg.matrix_rank uses: S.max() * max(D, C*P*P) * eps, with eps the
    machine epsilon of the weights' dtype (float32: the weights are only that precise); `rtol`
    replaces max(D, C*P*P) * eps. When C*P*P <= D and W has full rank the dimension is 0.
    """
    weight = patch_embedding_matrix(model)
    matrix = weight.double().cpu()
    d, n = matrix.shape
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    eps = torch.finfo(weight.dtype).eps
    factor = rtol if rtol is not None else max(d, n) * eps
    tolerance = float(singular.max()) * factor if singular.numel() else 0.0
    rank = int((singular > tolerance).sum())
    return ExactNullspace(basis=vh[rank:].T.contiguous(), rank=rank, input_dim=n, embed_dim=d,
                          tolerance=tolerance, singular_values=singular.tolist())


def exact_noise_like(images: torch.Tensor, nullspace: ExactNullspace, patch_size: int,
                     generator: torch.Generator, relative_norm: float = 1.0) -> torch.Tensor:
    """Random noise from the exact nullspace, patch-wise, for normalised images (N, C, H, W):
    every patch gets its own random combination of the basis, and each image's noise is scaled to
    `relative_norm` x that image's L2 norm (1.0: as large as the image itself)."""
    n, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    if nullspace.dimension == 0:
        return torch.zeros_like(images)
    coefficients = torch.randn(n, gh * gw, nullspace.dimension, generator=generator,
                               dtype=torch.float64)
    patches = coefficients @ nullspace.basis.T                     # (N, patches, C*P*P)
    noise = patches.view(n, gh, gw, c, patch_size, patch_size)
    noise = noise.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    scale = images.double().flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    return (noise * (relative_norm * scale).view(n, 1, 1, 1)).to(images)


# -- approximate (encoder-level) nullspace noise -------------------------------------------------

class SynthesisNotConverged(RunFailed):
    """A synthesis used its whole step budget without reaching epsilon (require_convergence)."""


@dataclass
class SynthesisResult:
    noise: torch.Tensor            # (num_patches, D)
    norm: float                    # ||v||_2 (all elements)
    start_norm: float              # ||v_0||_2 of the Uniform(-lim, lim) start
    moved: float                   # ||v - v_0|| / ||v_0||: how far the optimisation took it
    distance: float                # mean squared L2 distance of the softmax outputs, check set
    random_distance: float         # the same for un-optimised noise of the same norm (control)
    to_random: float               # ||v - r|| / ||v|| to that random noise r
    steps: int                     # optimiser steps taken
    converged: bool                # `distance` < epsilon within the budget
    check_images: int              # images `distance` is measured on

    def record(self, prefix: str = "noise_") -> dict:
        return {f"{prefix}norm": self.norm, f"{prefix}start_norm": self.start_norm,
                f"{prefix}moved_from_start": self.moved, f"{prefix}distance": self.distance,
                f"{prefix}random_distance": self.random_distance,
                f"{prefix}distance_to_random": self.to_random, f"{prefix}steps": self.steps,
                f"{prefix}converged": bool(self.converged),
                f"{prefix}check_images": self.check_images}


def noise_shape(model: AnyOrderViT) -> tuple[int, int]:
    """(num_patches, D): the shape of one approximate-nullspace noise tensor for `model`."""
    return int(model.vit.patch_embed.num_patches), int(model.vit.embed_dim)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter requiring grad, restored afterwards."""
    training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)


def probability_distance(noisy_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of the squared L2 distance between the softmax outputs (the stop criterion)."""
    delta = noisy_logits.float().softmax(dim=1) - clean_logits.float().softmax(dim=1)
    return delta.pow(2).sum(dim=1).mean()


class _CheckSet:
    """A fixed, seeded set of training images (with fixed block orders for a shuffled model) on
    which a noise's distance is measured: the clean outputs are computed once."""

    def __init__(self, model: AnyOrderViT, images: np.ndarray, size: int, batch_size: int,
                 shuffled: bool, generator: torch.Generator, device: torch.device):
        chosen = torch.randperm(len(images), generator=generator)[:size].sort().values.numpy()
        self.model, self.count = model, len(chosen)
        self.batches = []
        for start in range(0, len(chosen), batch_size):
            batch = to_model_input(images[chosen[start:start + batch_size]], model.spec, device)
            order = torch.randperm(model.depth, generator=generator) if shuffled else None
            with torch.no_grad():
                self.batches.append((batch, order, model(batch, order)))

    @torch.no_grad()
    def distance(self, noise: torch.Tensor) -> float:
        total = sum(float(probability_distance(self.model(batch, order, patch_noise=noise),
                                               clean)) * len(batch)
                    for batch, order, clean in self.batches)
        return total / self.count


def synthesize_noise(model: AnyOrderViT, images: np.ndarray, settings: SynthesisConfig,
                     generator: torch.Generator, device: torch.device | str = "cpu",
                     shuffled: Optional[bool] = None) -> SynthesisResult:
    """One approximate-nullspace noise tensor for `model` from uint8 training images (N,H,W,3).

    Each optimiser step draws `batch_size` images at random (seeded by `generator`) from the
    whole split, and, for a model trained shuffled (or `shuffled=True`), a fresh random block
    order. Before each step the batch's distance is compared with epsilon (the published rule);
    a batch under it is confirmed on a fixed check set of `check_images` training images, and the
    synthesis stops once that set's distance is under epsilon too (one batch of 64 alone stops
    on a lucky draw: on the default data such stops sat at 4x epsilon over the whole split).
    At most `steps` steps. Only the noise is optimised; the model's weights, gradients and mode
    are left as they were.
    """
    device = torch.device(device)
    shuffled = model.behaviour.shuffled_training if shuffled is None else shuffled
    if len(images) == 0:
        raise ValueError("the noise synthesis needs training images; got none")
    noise = ((torch.rand(noise_shape(model), generator=generator) * 2 - 1) * settings.lim).to(device)
    start = noise.clone()
    noise.requires_grad_(True)
    optimizer = torch.optim.AdamW([noise], lr=settings.lr, weight_decay=settings.weight_decay)
    steps, converged = 0, False
    with frozen(model):
        check = _CheckSet(model, images, min(settings.check_images, len(images)),
                          settings.batch_size, shuffled, generator, device)
        while True:
            index = torch.randperm(len(images), generator=generator)[:settings.batch_size]
            batch = to_model_input(images[index.sort().values.numpy()], model.spec, device)
            order = torch.randperm(model.depth, generator=generator) if shuffled else None
            with torch.no_grad():
                clean = model(batch, order)
            noisy = model(batch, order, patch_noise=noise)
            if float(probability_distance(noisy.detach(), clean)) < settings.epsilon and \
                    check.distance(noise.detach()) < settings.epsilon:
                converged = True
                break
            if steps == settings.steps:
                break
            loss = (noisy - clean).norm(dim=1).mean()
            if settings.log_norm_weight:
                loss = loss - settings.log_norm_weight * torch.log(noise.norm())
            (grad,) = torch.autograd.grad(loss, [noise])
            noise.grad = grad
            optimizer.step()
            steps += 1
        result = noise.detach()
        distance = check.distance(result)
        random = random_noise_like(result, generator)
        random_distance = check.distance(random)
    return SynthesisResult(noise=result, norm=float(result.norm()), start_norm=float(start.norm()),
                           moved=float((result - start).norm() / start.norm()), distance=distance,
                           random_distance=random_distance,
                           to_random=float((result - random).norm() / result.norm()), steps=steps,
                           converged=converged and distance < settings.epsilon,
                           check_images=check.count)


def random_noise_like(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Un-optimised noise of the same kind and norm: Uniform(-1, 1) rescaled to ||noise||."""
    random = torch.rand(noise.shape, generator=generator) * 2 - 1
    return (random * (noise.norm().cpu() / random.norm())).to(noise)


def epoch_noise(kind: str, settings: SynthesisConfig, images: np.ndarray,
                device: torch.device | str = "cpu"
                ) -> Optional[Callable[[AnyOrderViT, torch.Generator], tuple]]:
    """The per-epoch noise of a fine-tuning arm, for `train_model(epoch_noise=...)`:
    "nullspace": synthesised from the current weights; "random": un-optimised noise with the norm
    the synthesis reaches from the same weights (the control; its record is the synthesis whose
    norm it borrows: `noise_random_distance` describes the noise it trains on); "none": no noisy
    term (None). A synthesis that misses epsilon warns, or raises SynthesisNotConverged with
    `require_convergence`.
    Randomness comes from the generator `train_model` passes each epoch (seeded by the run's seed
    and the epoch), so a resumed run draws the same noise."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
    if kind == "none":
        return None

    def make(model: AnyOrderViT, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        result = synthesize_noise(model, images, settings, generator, device)
        record = result.record()
        if not result.converged:
            message = (f"the noise synthesis did not reach epsilon {settings.epsilon} within "
                       f"{settings.steps} steps (distance {result.distance:.4g} on "
                       f"{result.check_images} training images); raise nullspace.synthesis.steps")
            if settings.require_convergence:
                raise SynthesisNotConverged(message + " or set require_convergence: false")
            warnings.warn(message, stacklevel=2)
        if kind == "nullspace":
            return result.noise, record
        return random_noise_like(result.noise, generator), record
    return make


# -- invariance checks ---------------------------------------------------------------------------

def relative_logit_change(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per image ||noisy - clean|| / ||clean|| of the logits."""
    return (noisy.double() - clean.double()).norm(dim=1) / clean.double().norm(dim=1)


@torch.no_grad()
def invariance(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
               perturb: Callable[[torch.Tensor], dict], batches: Iterable[tuple],
               device: torch.device | str = "cpu") -> dict:
    """Accuracy and relative logit change of `model` under a perturbation.

    `perturb(batch)` returns keyword arguments of `model(...)` for the noisy pass (e.g.
    `{"images": noisy}` or `{"patch_noise": v}`); `batches` yields (image indices, order).
    """
    device = torch.device(device)
    model.to(device).eval()
    changes, clean_ok, noisy_ok, same = [], 0, 0, 0
    for index, order in batches:
        batch = to_model_input(images[index], model.spec, device)
        targets = torch.as_tensor(labels[index], device=device)
        clean = model(batch, order)
        noisy = model(**{"images": batch, "execution_order": order, **perturb(batch)})
        changes.append(relative_logit_change(noisy, clean).cpu())
        clean_ok += int((clean.argmax(1) == targets).sum())
        noisy_ok += int((noisy.argmax(1) == targets).sum())
        same += int((clean.argmax(1) == noisy.argmax(1)).sum())
    change = torch.cat(changes)
    n = len(change)
    return {"clean_accuracy": clean_ok / n, "noisy_accuracy": noisy_ok / n,
            "prediction_agreement": same / n, "predictions_changed": n - same,
            "relative_logit_change_mean": float(change.mean()),
            "relative_logit_change_max": float(change.max())}
