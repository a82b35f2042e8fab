"""The training settings every run shares: the optimiser, its schedule, augmentation, device
and processes (read by `anyorder.training.loop`, `optimizer` and `resume`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from anyorder.settings import Section, check_device, require


@dataclass(frozen=True)
class TrainConfig(Section):
    """What every training run shares: the optimiser, its schedule, augmentation, device."""
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    # Random shift augmentation: pad by this many pixels and crop back (0 = off: the paper
    # fine-tunes without augmentation).
    shift_pixels: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Processes (torchrun, DistributedDataParallel); batch_size stays the global batch.
    nproc: int = 1
    # Block orders under several processes: one per step for all ranks ("shared"), or each
    # rank its own ("rank"; rank 0 keeps the shared stream). Both recorded in train_orders.json.
    order_scope: Literal["shared", "rank"] = "shared"

    def check(self, key: str) -> None:
        require(self.epochs >= 1, f"{key}.epochs", "must be >= 1", self.epochs)
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        require(self.nproc >= 1, f"{key}.nproc", "must be >= 1", self.nproc)
        require(self.batch_size >= self.nproc, f"{key}.batch_size",
                f"must be >= nproc ({self.nproc}): every process needs images", self.batch_size)
        require(self.order_scope in ("shared", "rank"), f"{key}.order_scope",
                "must be shared or rank", self.order_scope)
        require(self.lr > 0, f"{key}.lr", "must be > 0", self.lr)
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0", self.weight_decay)
        require(0 <= self.warmup_epochs < self.epochs, f"{key}.warmup_epochs",
                f"must be in [0, epochs={self.epochs})", self.warmup_epochs)
        if self.grad_clip is not None:
            require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null", self.grad_clip)
        require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)",
                self.label_smoothing)
        require(self.shift_pixels >= 0, f"{key}.shift_pixels", "must be >= 0", self.shift_pixels)
        check_device(self.device, f"{key}.device")

