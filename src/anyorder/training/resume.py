"""The resume state of a training run: what is saved after every epoch and restored to continue a
killed run.

At the end of every epoch the whole training state (weights, optimizer, schedule, history, orders
used) is written atomically under `state_dir`, in a subdirectory named by a fingerprint of
everything the run depends on (settings, seed, model spec, start weights, data, this package's
code). Batches, orders, augmentation and torch's global generator (stochastic depth) are seeded
per (seed, epoch), so a run killed and restarted continues from its last finished epoch and ends
with the same weights as an uninterrupted run. A state file that is truncated, corrupt or written
for anything else is ignored (with a warning), never resumed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file

from anyorder.training.settings import TrainConfig
from anyorder.files import atomic_save_tensors
from anyorder.model.checkpoint import (optimizer_state_from_tensors, optimizer_state_to_tensors,
                                       tensors_digest)

if TYPE_CHECKING:
    from anyorder.training.loop import TrainResult

STATE_FILE = "state.safetensors"


def code_digest() -> str:
    """sha256 of this package's source: training state from other code is never resumed."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def run_fingerprint(model, cfg: TrainConfig, seed: int, train_data, extra: str,
                    order_sampling: str, position_loss_weight: float, noisy: bool,
                    code: str) -> str:
    """Everything a run's result depends on: the state of another run must not be resumed.
    `code`: the training code's digest (`code_digest()`)."""
    data = hashlib.sha256()
    for array in train_data:  # a chunk at a time: the images may be read from disk
        for start in range(0, len(array), 64):
            data.update(np.ascontiguousarray(array[start:start + 64]))
    blob = json.dumps({"cfg": asdict(cfg), "seed": seed, "spec": model.spec.to_dict(),
                       "order_sampling": order_sampling,
                       "position_loss_weight": position_loss_weight, "noisy": noisy,
                       "data": data.hexdigest(), "start": tensors_digest(model.state_dict()),
                       "code": code, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_state(state_dir: Optional[str | Path], fingerprint: str, model, optimizer, scheduler,
               result: TrainResult) -> tuple[Optional[Path], int]:
    """The run's state file (None without `state_dir`) and the epoch to start at: where a state
    of this run left off (restored into the model, optimizer, schedule and `result`), else 0."""
    if state_dir is None:
        return None, 0
    result.state_dir = Path(state_dir) / fingerprint[:16]
    state_path = result.state_dir / STATE_FILE
    start_epoch = 0
    if state_path.exists():
        start_epoch = restore_state(state_path, fingerprint, model, optimizer, scheduler, result)
        result.resumed_from_epoch = start_epoch
    return state_path, start_epoch


def save_state(path: Path, fingerprint, model, optimizer, scheduler, epoch: int,
               result: TrainResult) -> None:
    """Write the state after `epoch` epochs (atomically): weights, optimizer, schedule, history
    and orders, with the run's fingerprint and the tensors' checksum."""
    optim_tensors, optim_info = optimizer_state_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
    info = {"fingerprint": fingerprint, "epoch": epoch, "optimizer": optim_info,
            "scheduler": scheduler.state_dict(), "history": result.history,
            "orders": result.orders, "tensors_sha256": tensors_digest(tensors)}
    atomic_save_tensors(path, tensors, metadata={"training_state": json.dumps(info, default=str)})


def restore_state(path: Path, fingerprint, model, optimizer, scheduler,
                  result: TrainResult) -> int:
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
