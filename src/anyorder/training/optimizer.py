"""The optimizer of every training run (AdamW with weight-decay groups) and its learning-rate
schedule (linear warm-up, then cosine, linear or constant)."""
from __future__ import annotations

import math

import torch

from anyorder.training.settings import TrainConfig

# Devices with torch's fused AdamW kernel: one kernel per step instead of a Python loop over the
# parameters, 1.4-1.5x the training throughput of the default model on 2 CPU cores (bench/).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused where the parameters' device has the kernel); biases, norms, position
    embeddings and class token are not weight-decayed."""
    skip = {f"vit.{name}" for name in getattr(model.vit, "no_weight_decay", lambda: set())()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip or "slot_table" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device.type
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device in FUSED_ADAMW_DEVICES or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `cfg` over its epochs, stepped once per training step."""
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg.schedule))
