"""One training step: the forward module (what DistributedDataParallel wraps), the step's loss
terms, and backward plus optimizer step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from anyorder.model.vit import AnyOrderViT
from anyorder.training.distributed import Dist


class TrainStep(torch.nn.Module):
    """One training forward (clean, and with patch noise when given) returning tensors only: what
    DistributedDataParallel wraps, so it sees every output that needs a gradient."""

    def __init__(self, model: AnyOrderViT):
        super().__init__()
        self.model = model

    def forward(self, batch, order, noise=None):
        out = self.model.forward_detailed(batch, order)
        noisy = None if noise is None else \
            self.model.forward_detailed(batch, order, patch_noise=noise).logits
        return out.logits, out.position_logits, out.position_targets, noisy


def train_step_module(model: AnyOrderViT, dist: Dist, device: torch.device,
                      layerdrop: Optional[list[float]]) -> torch.nn.Module:
    """What runs a step's forward: the model itself, or DDP around it (gradients averaged over
    ranks; blocks that LayerDrop skips leave parameters unused, which DDP must be told)."""
    step_module = TrainStep(model)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel
        step_module = DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(layerdrop))
    return step_module


@dataclass
class Loss:
    backward_term: torch.Tensor  # what this rank back-propagates
    mean: torch.Tensor           # the mean over this rank's shard (for the history)


@dataclass
class LossTerms:
    """Cross-entropy terms of one step. Alone, the plain mean. Under N processes each rank sums
    its shard and scales by N / (global count): DDP averages the N gradients, so the result is
    the gradient of the mean over the whole global batch, as one process would compute it."""
    global_batch: int
    world_size: int
    label_smoothing: float

    def cross_entropy(self, logits, targets, per_image: int = 1,
                      smoothing: Optional[float] = None) -> Loss:
        smoothing = self.label_smoothing if smoothing is None else smoothing
        if self.world_size == 1:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
            return Loss(loss, loss)
        total = F.cross_entropy(logits.float(), targets, reduction="sum",
                                label_smoothing=smoothing)
        count = self.global_batch * per_image
        return Loss(total * (self.world_size / count), total / max(1, len(targets)))


@dataclass
class StepLosses:
    clean: Loss     # the classification loss
    position: Loss  # LS-pred's slot loss (zero without a position head)
    noisy: Loss     # the loss on noised patch tokens (zero without epoch noise)
    total: torch.Tensor  # what is back-propagated


def step_losses(outputs: tuple, targets: torch.Tensor, loss_terms: LossTerms,
                position_loss_weight: float, device: torch.device) -> StepLosses:
    """The step's losses from TrainStep's outputs: the clean cross-entropy, plus
    `position_loss_weight` x the slot cross-entropy and the noisy cross-entropy where present."""
    logits, position_logits, position_targets, noisy = outputs
    loss = loss_terms.cross_entropy(logits, targets)
    zero = torch.zeros((), device=device)
    position_loss = noisy_loss = Loss(zero, zero)  # unless the step has them
    total = loss.backward_term
    if position_logits is not None:
        position_loss = loss_terms.cross_entropy(
            position_logits.flatten(0, 1), position_targets.flatten(),
            per_image=position_targets.numel() // max(1, len(targets)),
            smoothing=0.0)
        total = total + position_loss_weight * position_loss.backward_term
    if noisy is not None:
        noisy_loss = loss_terms.cross_entropy(noisy, targets)
        total = total + noisy_loss.backward_term
    return StepLosses(loss, position_loss, noisy_loss, total)


def backward_and_step(total: torch.Tensor, model: torch.nn.Module, optimizer, scheduler,
                      grad_clip: Optional[float]) -> None:
    """Back-propagate the step's loss, clip the gradients' norm (when set), step the optimizer
    and the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
