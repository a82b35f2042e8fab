"""The training loop: one short, linear function for pre-training and every fine-tune variant.

`train_model` sets up, then for each epoch: for each batch, forward, loss, backward, step; then
evaluates and writes the resume state (`anyorder.training.resume`: a killed run continues from
its last finished epoch and ends with the same weights). The step's pieces are in
`anyorder.training.step`, the optimizer and schedule in `anyorder.training.optimizer`, the
epoch's on-device figures and when the host reads them in `anyorder.training.epoch_sums`.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from anyorder.training.settings import TrainConfig
from anyorder.data.inputs import random_shift, to_model_input
from anyorder.data.loader import EpochBatches, batch_loader
from anyorder.data.prepared import load_split
from anyorder.device import resolve_device
from anyorder.evaluation.accuracy import accuracy_for_orders, summarize
from anyorder.evaluation.orders import (STREAM_AUGMENT, STREAM_BATCHES, STREAM_GLOBAL, STREAM_NOISE,
                                        epoch_orders, generator_for, random_orders)
from anyorder.files import atomic_write_json
from anyorder.model.checkpoint import save_model
from anyorder.model.vit import AnyOrderViT
from anyorder.training import distributed
from anyorder.training.distributed import Dist
from anyorder.training.epoch_sums import SUMMED, EpochSums, TrainingDiverged, host_reads_sums_at
from anyorder.training.optimizer import FUSED_ADAMW_DEVICES, lr_factor, make_optimizer, make_scheduler
from anyorder.training.resume import (STATE_FILE, code_digest, open_state, remove_state,
                                      run_fingerprint, save_state)
from anyorder.training.step import (Loss, LossTerms, TrainStep, backward_and_step, step_losses,
                                    train_step_module)
from anyorder.threads import loader_workers

__all__ = ["FUSED_ADAMW_DEVICES", "STATE_FILE", "SUMMED", "Loss", "LossTerms", "TrainResult",
           "TrainStep", "TrainingDiverged", "code_digest", "lr_factor", "make_optimizer",
           "remove_state", "train_and_save", "train_model"]


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one record per epoch; no timings
    resumed_from_epoch: int = 0  # epochs already done when this call started (0 = fresh)
    orders: list[list[int]] = field(default_factory=list)  # shared per-batch orders, step by step
    epoch_seconds: list[float] = field(default_factory=list)  # epochs run by this call only
    state_dir: Optional[Path] = None  # where the resume state lives (remove it once saved)


@dataclass
class _Run:
    """What every epoch of a run shares, made once by `_set_up`."""
    model: AnyOrderViT
    cfg: TrainConfig
    seed: int
    dist: Dist
    device: torch.device
    progress: bool             # print per-epoch lines (and a bar on a terminal): rank 0 only
    steps_per_epoch: int
    shuffle: bool              # the variant trains in random block orders
    per_sample: bool           # one order per sample, not per batch
    layerdrop: Optional[list[float]]
    position_loss_weight: float
    epoch_noise: Optional[Callable]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    result: TrainResult
    fingerprint: str
    state_path: Optional[Path]  # the resume state file (None: not kept)
    start_epoch: int
    step_module: torch.nn.Module  # the model, or DDP around it
    order_rank: int             # whose orders this rank draws (cfg.order_scope)
    images: object              # the training split: ImageRows (read a batch at a time) or an array
    labels: np.ndarray
    sampler: EpochBatches       # the coming epoch's batches (this rank's shards), set per epoch
    loader: torch.utils.data.DataLoader  # reads them (workers: anyorder.threads.loader_workers)
    autocast: torch.autocast    # bfloat16 on a GPU, off on CPU


@dataclass
class _Epoch:
    """One epoch's draws (batches, augmentation, orders, noise), figures and progress bar."""
    permutation: np.ndarray
    batches: object             # iterator over this rank's (uint8 images, labels), step by step
    augment_gen: torch.Generator
    orders: list
    sums: EpochSums
    noise: Optional[torch.Tensor]
    noise_record: dict
    bar: object


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
    run = _set_up(model, train_data, cfg, seed, state_dir, fingerprint_extra, progress,
                  order_sampling, position_loss_weight, epoch_noise, layerdrop)
    for epoch in range(run.start_epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        this_epoch = _start_epoch(run, epoch)
        with _global_rng_seeded_for_epoch(seed, epoch, run.device):
            for step in range(run.steps_per_epoch):
                batch, targets, order, loss_terms = _batch(run, this_epoch, step)
                with run.autocast:
                    outputs = run.step_module(batch, order, this_epoch.noise)
                    losses = step_losses(outputs, targets, loss_terms, position_loss_weight,
                                         run.device)
                this_epoch.sums.flag_nonfinite(step, losses.total)
                read_now = host_reads_sums_at(step, run.steps_per_epoch, run.device)
                if read_now:
                    this_epoch.sums.stop_if_diverged(losses.total, epoch, run.scheduler)
                backward_and_step(losses.total, model, run.optimizer, run.scheduler,
                                  cfg.grad_clip)
                this_epoch.sums.add(losses, logits=outputs[0], targets=targets)
                _show_progress(this_epoch, read_now)
        record = _evaluate_epoch(run, this_epoch, epoch, val_data)
        run.result.history.append(record)
        seconds = time.perf_counter() - epoch_started
        run.result.epoch_seconds.append(seconds)
        _checkpoint(run, epoch)
        _log_epoch(run, record, epoch, seconds)
        if on_epoch_end is not None and run.dist.main:
            on_epoch_end(epoch + 1, record, seconds)
    if run.progress:
        print(f"training took {time.perf_counter() - started:.1f}s", flush=True)
    return run.result


def _set_up(model: AnyOrderViT, train_data, cfg: TrainConfig, seed: int, state_dir,
            fingerprint_extra: str, progress: bool, order_sampling: str,
            position_loss_weight: float, epoch_noise, layerdrop) -> _Run:
    """Join the processes, move the model to the device, make the optimizer and schedule,
    restore the resume state when there is one, wrap the step."""
    dist, device = distributed.init(resolve_device(cfg.device))
    steps_per_epoch = math.ceil(len(train_data[0]) / cfg.batch_size)
    extra = {"layerdrop": layerdrop}
    if dist.active:  # a state is resumed by as many processes as wrote it
        extra["world_size"] = dist.world_size
    fingerprint = run_fingerprint(model, cfg, seed, train_data,
                                  fingerprint_extra + json.dumps(extra), order_sampling,
                                  position_loss_weight, epoch_noise is not None, code_digest())
    model.to(device)
    # Flash attention on a GPU; on CPU its backward is slow for short sequences (model.py).
    model.use_fused_attention(device.type == "cuda")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    result = TrainResult()
    state_path, start_epoch = open_state(state_dir, fingerprint, model, optimizer, scheduler,
                                         result)
    step_module = train_step_module(model, dist, device, layerdrop)
    order_rank = dist.rank if cfg.order_scope == "rank" else 0
    # Batches are read from the prepared split as they are needed (a DataLoader), never the
    # whole split at once; they travel as uint8 and are converted and augmented on the device.
    images, labels = train_data
    sampler = EpochBatches()
    loader = batch_loader(images, labels, sampler, loader_workers(device.type),
                          pin_memory=device.type == "cuda")
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda")
    return _Run(model=model, cfg=cfg, seed=seed, dist=dist, device=device,
                progress=progress and dist.main, steps_per_epoch=steps_per_epoch,
                shuffle=model.behaviour.shuffled_training, per_sample=order_sampling == "sample",
                layerdrop=layerdrop, position_loss_weight=position_loss_weight,
                epoch_noise=epoch_noise, optimizer=optimizer, scheduler=scheduler, result=result,
                fingerprint=fingerprint, state_path=state_path, start_epoch=start_epoch,
                step_module=step_module, order_rank=order_rank, images=images, labels=labels,
                sampler=sampler, loader=loader, autocast=autocast)


def _start_epoch(run: _Run, epoch: int) -> _Epoch:
    """Switch to training mode and draw the epoch's batches, augmentation and orders (seeded by
    (seed, epoch)), its patch noise (when trained with noise); zero its sums."""
    run.model.train()
    permutation = torch.randperm(len(run.images), generator=generator_for(
        run.seed, epoch, STREAM_BATCHES)).numpy()
    size = run.cfg.batch_size
    shards = [permutation[start:start + size] for start in range(0, len(permutation), size)]
    run.sampler.batches = [index[run.dist.shard(len(index))] for index in shards]
    batches = iter(run.loader)
    augment_gen = generator_for(run.seed, epoch, STREAM_AUGMENT)
    orders = epoch_orders(run.seed, epoch, len(run.images), run.cfg.batch_size, run.model.depth,
                          run.shuffle, run.per_sample, run.layerdrop, rank=run.order_rank)
    sums = EpochSums(run.device)
    noise, noise_record = None, {}
    if run.epoch_noise is not None:
        noise, noise_record = run.epoch_noise(run.model, generator_for(run.seed, epoch,
                                                                       STREAM_NOISE))
        noise = noise.to(run.device)
    bar = _progress(run.steps_per_epoch, f"epoch {epoch + 1}/{run.cfg.epochs}", run.progress)
    return _Epoch(permutation, batches, augment_gen, orders, sums, noise, noise_record, bar)


@contextmanager
def _global_rng_seeded_for_epoch(seed: int, epoch: int, device: torch.device):
    """timm draws stochastic depth (and any dropout) from torch's global generator: seed it per
    epoch, inside a fork so the caller's global random state is left as it was."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(generator_for(seed, epoch, STREAM_GLOBAL).initial_seed()))
        yield


def _batch(run: _Run, this_epoch: _Epoch, step: int):
    """This rank's images, targets and block order(s) of the epoch's `step`, and the loss terms
    of its global batch. Each rank reads its shard of the global batch and draws the global
    batch's augmentation, keeping its shard's: N processes see what one process would."""
    cfg = run.cfg
    size = len(this_epoch.permutation[step * cfg.batch_size:(step + 1) * cfg.batch_size])
    part = run.dist.shard(size)
    images, targets = next(this_epoch.batches)
    batch = to_model_input(images, run.model.spec, run.device)
    batch = random_shift(batch, cfg.shift_pixels, this_epoch.augment_gen, total=size, part=part)
    targets = targets.to(run.device, non_blocking=True)
    order = this_epoch.orders[step]
    if (run.shuffle or run.layerdrop) and order.dim() == 1:
        run.result.orders.append(order.tolist())
    if order.dim() == 2:  # per-sample orders: this_epoch shard's rows
        order = order[part]
    return batch, targets, order, LossTerms(size, run.dist.world_size, cfg.label_smoothing)


def _show_progress(this_epoch: _Epoch, read_now: bool) -> None:
    """Advance the bar (if any); refresh its figures when the host reads the sums anyway."""
    if this_epoch.bar is not None:
        if read_now:
            totals = this_epoch.sums.totals()
            this_epoch.bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.3f}",
                                 acc=f"{totals['correct'] / totals['seen']:.3f}",
                                 refresh=False)
        this_epoch.bar.update(1)


def _evaluate_epoch(run: _Run, this_epoch: _Epoch, epoch: int, val_data) -> dict:
    """The epoch's history record: training figures over every rank's shard, learning rate,
    validation accuracy, and the position / noisy losses where the run has them."""
    if this_epoch.bar is not None:
        this_epoch.bar.close()
    totals = this_epoch.sums.totals()
    if run.dist.active:  # the epoch's figures over every rank's shard
        keys = sorted(totals)
        totals = dict(zip(keys, distributed.all_sum([totals[k] for k in keys], run.dist,
                                                    run.device)))
    record = {
        "epoch": epoch + 1,
        "train_loss": totals["loss"] / totals["seen"],
        "train_accuracy": totals["correct"] / totals["seen"],
        "lr": run.scheduler.get_last_lr()[0],
        **_validate(run.model, val_data, run.seed, epoch, run.device),
    }
    record.update({key: totals[summed] / totals["seen"]
                   for key, summed in run.model.behaviour.recorded_sums.items()})
    if run.epoch_noise is not None:
        record["train_noisy_loss"] = totals["noisy_loss"] / totals["seen"]
        record.update(this_epoch.noise_record)
    return record


def _checkpoint(run: _Run, epoch: int) -> None:
    """Rank 0 writes the resume state after `epoch`; no rank runs ahead of the state that would
    resume it."""
    if run.state_path is not None and run.dist.main:
        save_state(run.state_path, run.fingerprint, run.model, run.optimizer, run.scheduler,
                   epoch + 1, run.result)
    distributed.barrier(run.dist)


def _log_epoch(run: _Run, record: dict, epoch: int, seconds: float) -> None:
    if run.progress:
        print(f"epoch {epoch + 1}/{run.cfg.epochs}: loss {record['train_loss']:.4f} "
              f"acc {record['train_accuracy']:.4f} val {record['val_accuracy_sequential']:.4f} "
              f"(shuffled {record['val_accuracy_shuffled']:.4f}) {seconds:.1f}s", flush=True)


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
              "shuffled": model.behaviour.shuffled_training, "epochs": cfg.epochs,
              "num_train": int(len(train_data[1])), "batch_size": cfg.batch_size,
              "depth": model.depth, "layerdrop": layerdrop}
    if dist.active:
        recipe["world_size"] = dist.world_size
        recipe["order_scope"] = cfg.order_scope
        if cfg.order_scope == "rank":
            # Listed: rank 0's orders; rank r's are epoch_orders(..., rank=r) of the same
            # settings (anyorder.evaluation.orders), one shard of each global batch each.
            recipe["rank_orders"] = "anyorder.evaluation.orders.epoch_orders(..., rank=r)"
    if order_sampling == "sample" and model.behaviour.shuffled_training:
        # One order per sample per step is too much to list; regenerate it exactly with
        # anyorder.evaluation.orders.epoch_orders(seed, epoch, num_train, batch_size, depth, True, True).
        recipe["orders"] = None
    else:
        recipe["orders"] = result.orders
    atomic_write_json(Path(out_dir) / "train_orders.json", recipe)
    remove_state(result)
    distributed.barrier(dist)
    return result


def _validate(model: AnyOrderViT, val_data, seed: int, epoch: int, device) -> dict:
    """Validation accuracy in sequential order and in a few seeded random orders (one pass:
    the images go through the stem once for all of them)."""
    val_x, val_y = val_data
    orders = random_orders(model.depth, 3, seed * 1000 + epoch)
    accuracies = accuracy_for_orders(model, val_x, val_y, [None] + orders, device=device)
    return {"val_accuracy_sequential": accuracies[0],
            "val_accuracy_shuffled": summarize(accuracies[1:])["mean"]}


def _progress(total: int, description: str, enabled: bool):
    """A live bar on a terminal; in logs (DVC, Prefect, CI) the one line per epoch is enough."""
    import sys
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=1.0)
