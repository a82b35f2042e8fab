"""The training loop: one short, linear function for pre-training and every fine-tune variant.

Resuming: at the end of every epoch the whole training state (weights, optimizer, schedule,
history, orders used) is written atomically to `state_dir`. Batches, orders and augmentation of
an epoch come from generators seeded by (seed, epoch), so a run killed and restarted continues
from its last finished epoch and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import (atomic_save_tensors, optimizer_state_from_tensors,
                         optimizer_state_to_tensors)
from .config import TrainConfig
from .evaluate import accuracy_for_orders
from .model import SHUFFLED_TRAINING, AnyOrderViT
from .orders import (STREAM_AUGMENT, STREAM_BATCHES, STREAM_ORDERS, OrderSampler, generator_for,
                     random_orders)
from .tensors import random_shift, resolve_device, to_model_input

STATE_FILE = "state.safetensors"


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one record per epoch
    resumed_from_epoch: int = 0  # epochs already done when this call started (0 = fresh)
    orders: list[list[int]] = field(default_factory=list)  # shared per-batch orders, step by step
    seconds: float = 0.0


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases, norms, position embeddings and class token are not weight-decayed."""
    skip = {f"vit.{name}" for name in getattr(model.vit, "no_weight_decay", lambda: set())()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip or "slot_table" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


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


def train_model(model: AnyOrderViT, train_data: tuple[np.ndarray, np.ndarray],
                val_data: tuple[np.ndarray, np.ndarray], cfg: TrainConfig, seed: int,
                state_dir: Optional[str | Path] = None, fingerprint_extra: str = "",
                on_epoch_end: Optional[Callable[[int, dict], None]] = None,
                progress: bool = True) -> TrainResult:
    """Train `model` in place on uint8 images; return the per-epoch history.

    Sequential variants train in order 0..L-1; LayerShuffle variants in a random order per batch
    (or per sample, `cfg.order_sampling`). `on_epoch_end(epoch, record)` runs after the epoch's
    state is saved (logging, tests that kill the process).
    """
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    model.to(device)
    train_x, train_y = train_data
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg.schedule))
    shuffle = SHUFFLED_TRAINING[model.variant]
    sampler = OrderSampler(model.depth, shuffle, per_sample=cfg.order_sampling == "sample")
    fingerprint = _fingerprint(model, cfg, seed, len(train_x), fingerprint_extra)

    result = TrainResult()
    start_epoch = 0
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    if state_path is not None and state_path.is_file():
        start_epoch = _restore(state_path, fingerprint, model, optimizer, scheduler, result)
        result.resumed_from_epoch = start_epoch

    images = torch.as_tensor(train_x)  # uint8 stays compact; converted per batch
    labels = torch.as_tensor(train_y, dtype=torch.long)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        model.train()
        batch_gen = generator_for(seed, epoch, STREAM_BATCHES)
        order_gen = generator_for(seed, epoch, STREAM_ORDERS)
        augment_gen = generator_for(seed, epoch, STREAM_AUGMENT)
        permutation = torch.randperm(len(images), generator=batch_gen)
        totals = {"loss": 0.0, "position_loss": 0.0, "correct": 0, "seen": 0}
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        for step in range(steps_per_epoch):
            index = permutation[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = to_model_input(images[index], model.spec, device)
            batch = random_shift(batch, cfg.shift_pixels, augment_gen)
            targets = labels[index].to(device)
            order = sampler.sample(len(index), order_gen)
            if shuffle and order.dim() == 1:
                result.orders.append(order.tolist())
            with autocast:
                out = model.forward_detailed(batch, order)
                loss = F.cross_entropy(out.logits.float(), targets, label_smoothing=cfg.label_smoothing)
                position_loss = torch.zeros((), device=device)
                if out.position_logits is not None:
                    position_loss = F.cross_entropy(out.position_logits.flatten(0, 1).float(),
                                                    out.position_targets.flatten())
                total = loss + cfg.position_loss_weight * position_loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            totals["loss"] += loss.item() * len(index)
            totals["position_loss"] += position_loss.item() * len(index)
            totals["correct"] += (out.logits.argmax(1) == targets).sum().item()
            totals["seen"] += len(index)
            if bar is not None:
                bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.3f}",
                                acc=f"{totals['correct'] / totals['seen']:.3f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        record = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / totals["seen"],
            "train_accuracy": totals["correct"] / totals["seen"],
            "lr": scheduler.get_last_lr()[0],
            **_validate(model, val_data, seed, epoch, device),
            "seconds": time.perf_counter() - epoch_started,
        }
        if model.variant == "ls_pred":
            record["train_position_loss"] = totals["position_loss"] / totals["seen"]
        result.history.append(record)
        if state_path is not None:
            _save_state(state_path, fingerprint, model, optimizer, scheduler, epoch + 1, result)
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                  f"acc {record['train_accuracy']:.4f} val {record['val_accuracy_sequential']:.4f} "
                  f"(shuffled {record['val_accuracy_shuffled']:.4f}) {record['seconds']:.1f}s",
                  flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    result.seconds = time.perf_counter() - started
    return result


def _validate(model: AnyOrderViT, val_data, seed: int, epoch: int, device) -> dict:
    """Validation accuracy in sequential order and in a few seeded random orders."""
    val_x, val_y = val_data
    orders = [None] + random_orders(model.depth, 3, seed * 1000 + epoch)
    accuracies = accuracy_for_orders(model, val_x, val_y, orders, device=device)
    return {"val_accuracy_sequential": accuracies[0],
            "val_accuracy_shuffled": float(np.mean(accuracies[1:]))}


def _fingerprint(model, cfg: TrainConfig, seed: int, num_train: int, extra: str) -> str:
    blob = json.dumps({"cfg": asdict(cfg), "seed": seed, "spec": model.spec.to_dict(),
                       "num_train": num_train, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_state(path: Path, fingerprint, model, optimizer, scheduler, epoch: int,
                result: TrainResult) -> None:
    optim_tensors, optim_info = optimizer_state_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
    info = {"fingerprint": fingerprint, "epoch": epoch, "optimizer": optim_info,
            "scheduler": scheduler.state_dict(), "history": result.history,
            "orders": result.orders}
    atomic_save_tensors(path, tensors, metadata={"training_state": json.dumps(info, default=str)})


def _restore(path: Path, fingerprint, model, optimizer, scheduler, result: TrainResult) -> int:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["training_state"])
    if info["fingerprint"] != fingerprint:
        # Settings or inputs changed since that state was written: it is not this run's.
        print(f"[train] ignoring {path}: written for other settings or data; starting fresh")
        return 0
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(optimizer_state_from_tensors(optim_tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    result.history = info["history"]
    result.orders = info["orders"]
    print(f"[train] resumed from {path} after epoch {info['epoch']}")
    return int(info["epoch"])


def _progress(total: int, description: str, enabled: bool):
    """A live bar on a terminal; in logs (DVC, Prefect, CI) the one line per epoch is enough."""
    import sys
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=1.0)
