"""The training loop: one short, linear function for pre-training and every fine-tune variant.

Resuming: at the end of every epoch the whole training state (weights, optimizer, schedule,
history, orders used) is written atomically under `state_dir`, in a subdirectory named by a
fingerprint of everything the run depends on (settings, seed, model spec, start weights, data,
this package's code). Batches, orders, augmentation and torch's global generator (stochastic
depth) are seeded per (seed, epoch), so a run killed and restarted continues from its last
finished epoch and ends with the same weights as an uninterrupted run. A state file that is
truncated, corrupt or written for anything else is ignored (with a warning), never resumed.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from anyorder.training import distributed
from anyorder.model.checkpoint import (optimizer_state_from_tensors, optimizer_state_to_tensors, save_model,
                         tensors_digest)
from anyorder.config import TrainConfig
from anyorder.data.prepare import load_split
from anyorder.errors import RunFailed
from anyorder.evaluation.accuracy import accuracy_for_orders
from anyorder.files import atomic_save_tensors, atomic_write_json
from anyorder.model.vit import SHUFFLED_TRAINING, AnyOrderViT
from anyorder.evaluation.orders import (STREAM_AUGMENT, STREAM_BATCHES, STREAM_GLOBAL, STREAM_NOISE, epoch_orders,
                     generator_for, random_orders)
from anyorder.data.inputs import random_shift, to_model_input
from anyorder.device import resolve_device

STATE_FILE = "state.safetensors"


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite: the run stops instead of saving a broken model."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one record per epoch; no timings
    resumed_from_epoch: int = 0  # epochs already done when this call started (0 = fresh)
    orders: list[list[int]] = field(default_factory=list)  # shared per-batch orders, step by step
    epoch_seconds: list[float] = field(default_factory=list)  # epochs run by this call only
    state_dir: Optional[Path] = None  # where the resume state lives (remove it once saved)


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


def train_model(model: AnyOrderViT, train_data: tuple[np.ndarray, np.ndarray],
                val_data: tuple[np.ndarray, np.ndarray], cfg: TrainConfig, seed: int,
                state_dir: Optional[str | Path] = None, fingerprint_extra: str = "",
                on_epoch_end: Optional[Callable[[int, dict, float], None]] = None,
                progress: bool = True, order_sampling: str = "batch",
                position_loss_weight: float = 1.0,
                epoch_noise: Optional[Callable[[AnyOrderViT, torch.Generator], tuple]] = None,
                layerdrop: Optional[list[float]] = None) -> TrainResult:
    """Train `model` in place on uint8 images; return the per-epoch history.

    Sequential variants train in order 0..L-1; LayerShuffle variants in a random order per batch
    (or per sample: `order_sampling="sample"`); LS-pred adds `position_loss_weight` x the slot
    cross-entropy. `layerdrop` (one skip probability per execution slot,
    `anyorder.evaluation.orders.layerdrop_rates`) skips blocks for a whole batch, keeping the order of the
    rest (LayerDrop). `on_epoch_end(epoch, record, seconds)` runs after the epoch's state is saved
    (logging, tests that kill the process). Raises TrainingDiverged on a NaN/inf loss.

    `epoch_noise(model, generator)` (nullspace fine-tuning, `anyorder.robustness.nullspace.epoch_noise`):
    called at the start of every epoch with the current weights; it returns patch-token noise and
    a record for the history, and the loss becomes CE(clean) + CE(noise added to the patch
    tokens), every image, in the same block order.
    """
    started = time.perf_counter()
    dist, device = distributed.init(resolve_device(cfg.device))
    progress = progress and dist.main
    train_x, train_y = train_data
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    shuffle = SHUFFLED_TRAINING[model.variant]
    per_sample = order_sampling == "sample"
    extra = {"layerdrop": layerdrop}
    if dist.active:  # a state is resumed by as many processes as wrote it
        extra["world_size"] = dist.world_size
    fingerprint = _fingerprint(model, cfg, seed, train_data, fingerprint_extra + json.dumps(extra),
                               order_sampling, position_loss_weight, epoch_noise is not None)
    model.to(device)
    # Flash attention on a GPU; on CPU its backward is slow for short sequences (model.py).
    model.use_fused_attention(device.type == "cuda")
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg.schedule))

    result = TrainResult()
    start_epoch = 0
    state_path = None
    if state_dir is not None:
        result.state_dir = Path(state_dir) / fingerprint[:16]
        state_path = result.state_dir / STATE_FILE
        if state_path.exists():
            start_epoch = _restore(state_path, fingerprint, model, optimizer, scheduler, result)
            result.resumed_from_epoch = start_epoch

    # What runs a step's forward: the model itself, or DDP around it (gradients averaged over
    # ranks; blocks that LayerDrop skips leave parameters unused, which DDP must be told).
    step_module = TrainStep(model)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel
        step_module = DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(layerdrop))
    order_rank = dist.rank if cfg.order_scope == "rank" else 0
    # The training split goes to the device once, as compact uint8, and each batch is indexed,
    # converted and augmented there: no host-to-device copy per step.
    images = torch.as_tensor(train_x).to(device)
    labels = torch.as_tensor(train_y, dtype=torch.long).to(device)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        model.train()
        permutation = torch.randperm(len(images), generator=generator_for(
            seed, epoch, STREAM_BATCHES)).to(device)
        augment_gen = generator_for(seed, epoch, STREAM_AUGMENT)
        orders = epoch_orders(seed, epoch, len(images), cfg.batch_size, model.depth, shuffle,
                              per_sample, layerdrop, rank=order_rank)
        # The epoch's sums stay on the device (float64: the same arithmetic as Python floats)
        # and the loss's finiteness is a device flag: on a GPU no step waits for the host.
        # On CPU, where reading them costs nothing, a diverged loss is caught at its own step.
        sums = torch.zeros(len(SUMMED), dtype=torch.float64, device=device)
        seen_total = 0
        nonfinite_step = torch.full((), -1, dtype=torch.long, device=device)
        noise, noise_record = None, {}
        if epoch_noise is not None:
            noise, noise_record = epoch_noise(model, generator_for(seed, epoch, STREAM_NOISE))
            noise = noise.to(device)
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        # timm draws stochastic depth (and any dropout) from torch's global generator: seed it
        # per epoch, inside a fork so the caller's global random state is left as it was.
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(generator_for(seed, epoch, STREAM_GLOBAL).initial_seed()))
            for step in range(steps_per_epoch):
                index = permutation[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                # The whole global batch is prepared (and augmented) alike on every rank, then
                # each rank takes its shard: N processes see what one process would.
                batch = to_model_input(images[index], model.spec, device)
                batch = random_shift(batch, cfg.shift_pixels, augment_gen)
                targets = labels[index].to(device)
                order = orders[step]
                if (shuffle or layerdrop) and order.dim() == 1:
                    result.orders.append(order.tolist())
                part = dist.shard(len(index))
                batch, targets = batch[part], targets[part]
                if order.dim() == 2:  # per-sample orders: this shard's rows
                    order = order[part]
                loss_terms = LossTerms(len(index), dist.world_size, cfg.label_smoothing)
                with autocast:
                    logits, position_logits, position_targets, noisy = step_module(
                        batch, order, noise)
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
                nonfinite_step = torch.where((nonfinite_step < 0) & ~torch.isfinite(total),
                                             step, nonfinite_step)
                # What the host reads from the device (the divergence flag, the bar's figures):
                # every step on CPU, where it costs nothing; on a GPU once, at the epoch's end.
                read_now = device.type == "cpu" or step == steps_per_epoch - 1
                if read_now:
                    _stop_if_diverged(nonfinite_step, total, epoch, scheduler)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                seen = len(targets)
                sums += torch.stack([loss.mean.detach().double() * seen,
                                     position_loss.mean.detach().double() * seen,
                                     noisy_loss.mean.detach().double() * seen,
                                     (logits.argmax(1) == targets).sum().double()])
                seen_total += seen
                if bar is not None:
                    if read_now:
                        totals = _totals(sums, seen_total)
                        bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.3f}",
                                        acc=f"{totals['correct'] / totals['seen']:.3f}",
                                        refresh=False)
                    bar.update(1)
        if bar is not None:
            bar.close()
        totals = _totals(sums, seen_total)
        if dist.active:  # the epoch's figures over every rank's shard
            keys = sorted(totals)
            totals = dict(zip(keys, distributed.all_sum([totals[k] for k in keys], dist,
                                                        device)))
        record = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / totals["seen"],
            "train_accuracy": totals["correct"] / totals["seen"],
            "lr": scheduler.get_last_lr()[0],
            **_validate(model, val_data, seed, epoch, device),
        }
        if model.variant == "ls_pred":
            record["train_position_loss"] = totals["position_loss"] / totals["seen"]
        if epoch_noise is not None:
            record["train_noisy_loss"] = totals["noisy_loss"] / totals["seen"]
            record.update(noise_record)
        result.history.append(record)
        seconds = time.perf_counter() - epoch_started
        result.epoch_seconds.append(seconds)
        if state_path is not None and dist.main:
            _save_state(state_path, fingerprint, model, optimizer, scheduler, epoch + 1, result)
        distributed.barrier(dist)  # no rank runs ahead of the state that would resume it
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                  f"acc {record['train_accuracy']:.4f} val {record['val_accuracy_sequential']:.4f} "
                  f"(shuffled {record['val_accuracy_shuffled']:.4f}) {seconds:.1f}s", flush=True)
        if on_epoch_end is not None and dist.main:
            on_epoch_end(epoch + 1, record, seconds)
    if progress:
        print(f"training took {time.perf_counter() - started:.1f}s", flush=True)
    return result


def train_and_save(model: AnyOrderViT, prepared_dir: str | Path, cfg: TrainConfig, seed: int,
                   out_dir: str | Path, state_dir: Optional[str | Path] = None,
                   order_sampling: str = "batch", position_loss_weight: float = 1.0,
                   fingerprint_extra: str = "",
                   on_epoch_end: Optional[Callable[[int, dict, float], None]] = None,
                   epoch_noise: Optional[Callable[[AnyOrderViT, torch.Generator], tuple]] = None,
                   info: Optional[dict] = None, layerdrop: Optional[list[float]] = None
                   ) -> TrainResult:
    """Train on a prepared data set (train split; val for the per-epoch check), then write
    `out_dir`: the model (`model.safetensors` + `model.json` with the spec and the training
    settings) and `train_orders.json` (the orders used, or how to regenerate per-sample ones).
    Everything written depends only on the inputs (no timings), and the resume state is removed
    once the model is saved. `info` is recorded under "training" in model.json."""
    train_data, val_data = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    result = train_model(model, train_data, val_data, cfg, seed, state_dir=state_dir,
                         fingerprint_extra=fingerprint_extra, on_epoch_end=on_epoch_end,
                         order_sampling=order_sampling, position_loss_weight=position_loss_weight,
                         epoch_noise=epoch_noise, layerdrop=layerdrop)
    dist = distributed.from_env()
    if not dist.main:  # rank 0 writes; the others wait until it has
        distributed.barrier(dist)
        return result
    training = {"config": asdict(cfg), "seed": seed, "order_sampling": order_sampling,
                "position_loss_weight": position_loss_weight, "layerdrop": layerdrop,
                **(info or {}),
                "final": result.history[-1]}
    save_model(model, out_dir, {"training": training})
    recipe = {"seed": seed, "order_sampling": order_sampling,
              "shuffled": SHUFFLED_TRAINING[model.variant], "epochs": cfg.epochs,
              "num_train": int(len(train_data[1])), "batch_size": cfg.batch_size,
              "depth": model.depth, "layerdrop": layerdrop}
    if dist.active:
        recipe["world_size"] = dist.world_size
        recipe["order_scope"] = cfg.order_scope
        if cfg.order_scope == "rank":
            # Listed: rank 0's orders; rank r's are epoch_orders(..., rank=r) of the same
            # settings (anyorder.evaluation.orders), one shard of each global batch each.
            recipe["rank_orders"] = "anyorder.evaluation.orders.epoch_orders(..., rank=r)"
    if order_sampling == "sample" and SHUFFLED_TRAINING[model.variant]:
        # One order per sample per step is too much to list; regenerate it exactly with
        # anyorder.evaluation.orders.epoch_orders(seed, epoch, num_train, batch_size, depth, True, True).
        recipe["orders"] = None
    else:
        recipe["orders"] = result.orders
    atomic_write_json(Path(out_dir) / "train_orders.json", recipe)
    remove_state(result)
    distributed.barrier(dist)
    return result


SUMMED = ("loss", "position_loss", "noisy_loss", "correct")  # an epoch's per-step sums


def _totals(sums: torch.Tensor, seen: int) -> dict:
    """The epoch's sums (on the device) as Python numbers, with the count of images seen."""
    values = sums.tolist()
    totals = dict(zip(SUMMED, values), seen=seen)
    totals["correct"] = int(round(totals["correct"]))
    return totals


def _stop_if_diverged(nonfinite_step: torch.Tensor, total: torch.Tensor, epoch: int,
                      scheduler) -> None:
    """Raise TrainingDiverged if a step of this epoch had a non-finite loss (its first)."""
    step = int(nonfinite_step)
    if step >= 0:
        raise TrainingDiverged(
            f"the training loss became non-finite ({float(total)} at the last step checked) at "
            f"epoch {epoch + 1}, step {step + 1} (lr {scheduler.get_last_lr()[0]:.3g}); lower "
            f"the learning rate or set grad_clip. No model was saved.")


def _validate(model: AnyOrderViT, val_data, seed: int, epoch: int, device) -> dict:
    """Validation accuracy in sequential order and in a few seeded random orders."""
    val_x, val_y = val_data
    orders = [None] + random_orders(model.depth, 3, seed * 1000 + epoch)
    accuracies = accuracy_for_orders(model, val_x, val_y, orders, device=device)
    return {"val_accuracy_sequential": accuracies[0],
            "val_accuracy_shuffled": float(np.mean(accuracies[1:]))}


# -- resume state ----------------------------------------------------------------------------------

def code_digest() -> str:
    """sha256 of this package's source: training state from other code is never resumed."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _fingerprint(model, cfg: TrainConfig, seed: int, train_data, extra: str,
                 order_sampling: str, position_loss_weight: float, noisy: bool = False) -> str:
    """Everything a run's result depends on: the state of another run must not be resumed."""
    data = hashlib.sha256()
    for array in train_data:
        data.update(np.ascontiguousarray(array).tobytes())
    blob = json.dumps({"cfg": asdict(cfg), "seed": seed, "spec": model.spec.to_dict(),
                       "order_sampling": order_sampling,
                       "position_loss_weight": position_loss_weight, "noisy": noisy,
                       "data": data.hexdigest(), "start": tensors_digest(model.state_dict()),
                       "code": code_digest(), "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_state(path: Path, fingerprint, model, optimizer, scheduler, epoch: int,
                result: TrainResult) -> None:
    optim_tensors, optim_info = optimizer_state_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
    info = {"fingerprint": fingerprint, "epoch": epoch, "optimizer": optim_info,
            "scheduler": scheduler.state_dict(), "history": result.history,
            "orders": result.orders, "tensors_sha256": tensors_digest(tensors)}
    atomic_save_tensors(path, tensors, metadata={"training_state": json.dumps(info, default=str)})


def _restore(path: Path, fingerprint, model, optimizer, scheduler, result: TrainResult) -> int:
    """Load a saved state into the run; 0 (start fresh) if it is unreadable or not this run's."""
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["training_state"])
        tensors = load_file(str(path))
        intact = tensors_digest(tensors) == info["tensors_sha256"]
    except Exception as exc:  # truncated or corrupt (power loss, full disk): any error means that
        warnings.warn(f"[train] {path} is unreadable ({type(exc).__name__}: {exc}); removing it "
                      f"and starting fresh", stacklevel=2)
        path.unlink(missing_ok=True)
        return 0
    if not intact or info["fingerprint"] != fingerprint:
        why = "its tensors do not match their checksum" if not intact else (
            "it was written for other settings, data, start weights or code")
        warnings.warn(f"[train] ignoring {path}: {why}; starting fresh", stacklevel=2)
        path.unlink(missing_ok=True)
        return 0
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(optimizer_state_from_tensors(optim_tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    result.history = info["history"]
    result.orders = info["orders"]
    print(f"[train] resumed from {path} after epoch {info['epoch']}", flush=True)
    return int(info["epoch"])


def remove_state(result: TrainResult) -> None:
    """Delete a finished run's resume state (call once its model is saved)."""
    if result.state_dir is not None:
        shutil.rmtree(result.state_dir, ignore_errors=True)


def _progress(total: int, description: str, enabled: bool):
    """A live bar on a terminal; in logs (DVC, Prefect, CI) the one line per epoch is enough."""
    import sys
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=1.0)
