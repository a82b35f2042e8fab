"""The robustness settings: corruptions (`anyorder.robustness.corruptions`), attacks
(`anyorder.robustness.attacks`), the approximate-nullspace noise synthesis
(`anyorder.robustness.nullspace`) and the evaluation that runs them all
(`anyorder.robustness.evaluate`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from anyorder.robustness.corruption_names import CORRUPTIONS, SEVERITIES
from anyorder.settings import Section, check_device, require


@dataclass(frozen=True)
class SynthesisConfig(Section):
    """The synthesis of one approximate-nullspace noise (spec section 2;
    anyorder.robustness.nullspace.synthesize_noise). The optimiser is AdamW on the noise alone."""
    lim: float = 3.0               # start: Uniform(-lim, lim) elementwise (published: 3)
    lr: float = 0.1                # AdamW's learning rate (published: 0.1)
    weight_decay: float = 0.0      # AdamW's weight decay on the noise (0: decay would shrink it)
    epsilon: float = 0.01          # stop once mean squared L2 distance of softmax outputs < this
    steps: int = 2000              # budget: optimiser steps at most
    batch_size: int = 64           # training images per step, drawn at random from the split
    check_images: int = 512        # training images the stop is confirmed on (all, if fewer)
    log_norm_weight: float = 0.0   # lambda of the optional -lambda * log ||v|| term (code: 0)
    # Fine-tuning (anyorder.robustness.nullspace.epoch_noise): a synthesis that misses epsilon is
    # an error (SynthesisNotConverged) rather than a warning.
    require_convergence: bool = False

    def check(self, key: str) -> None:
        for name in ("lim", "lr", "epsilon"):
            require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0", getattr(self, name))
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0", self.weight_decay)
        for name in ("steps", "batch_size", "check_images"):
            require(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1",
                    getattr(self, name))
        require(self.log_norm_weight >= 0, f"{key}.log_norm_weight", "must be >= 0",
                self.log_norm_weight)


@dataclass(frozen=True)
class CorruptionConfig(Section):
    names: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    seed: int = 0

    def check(self, key: str) -> None:
        for name in self.names:
            require(name in CORRUPTIONS, f"{key}.names", f"unknown corruption (known: "
                    f"{', '.join(CORRUPTIONS)})", name)
        require(len(set(self.names)) == len(self.names) and self.names, f"{key}.names",
                "must list each corruption once, at least one", self.names)
        for severity in self.severities:
            require(severity in SEVERITIES, f"{key}.severities", "must be in 1..5",
                    severity)
        require(len(set(self.severities)) == len(self.severities) and self.severities,
                f"{key}.severities", "must list each severity once, at least one",
                self.severities)


@dataclass(frozen=True)
class AttackConfig(Section):
    names: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    # L-infinity budgets on pixels in [0, 1]: 1/255, 2/255, 4/255, 8/255
    eps: list[float] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    pgd_steps: int = 10
    pgd_step_size: float = 2.5    # PGD's step = this x eps / pgd_steps (Madry et al.)
    pgd_random_start: bool = True
    seed: int = 0

    def check(self, key: str) -> None:
        for name in self.names:
            require(name in ("fgsm", "pgd"), f"{key}.names", "unknown attack (known: fgsm, pgd)",
                    name)
        require(bool(self.names), f"{key}.names", "must list at least one attack", self.names)
        for eps in self.eps:
            require(0 < eps <= 1, f"{key}.eps", "every budget must be in (0, 1] (pixels are in "
                    "[0, 1]: 8/255 = 0.0314)", eps)
        require(bool(self.eps), f"{key}.eps", "must list at least one budget", self.eps)
        require(self.pgd_steps >= 1, f"{key}.pgd_steps", "must be >= 1", self.pgd_steps)
        require(self.pgd_step_size > 0, f"{key}.pgd_step_size", "must be > 0",
                self.pgd_step_size)


@dataclass(frozen=True)
class RobustnessConfig(Section):
    """Robustness of every model the pipeline trains (evaluate@<run> and nullspace@<arm>)."""
    corruptions: CorruptionConfig = field(default_factory=CorruptionConfig)
    attacks: AttackConfig = field(default_factory=AttackConfig)
    # Corruptions and attacks run on this many test images (a seeded subset; null = all of them).
    num_images: Optional[int] = None
    subset_seed: int = 0
    num_orders: int = 8              # LS models: random orders, each test image runs in one
    order_seed: int = 777
    noise_seed: int = 0              # exact nullspace noise and the synthesised noise
    # The approximate-nullspace noise the invariance check synthesises for each model (the
    # evaluation's own settings; a nullspace fine-tune's are nullspace.synthesis).
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    exact_rtol: Optional[float] = None  # rank tolerance factor (null: max(D, C*P*P) * eps)
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        self.corruptions.check(f"{key}.corruptions")
        self.attacks.check(f"{key}.attacks")
        self.synthesis.check(f"{key}.synthesis")
        if self.num_images is not None:
            require(self.num_images >= 1, f"{key}.num_images", "must be >= 1 or null",
                    self.num_images)
        require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        if self.exact_rtol is not None:
            require(0 < self.exact_rtol < 1, f"{key}.exact_rtol", "must be in (0, 1) or null",
                    self.exact_rtol)
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")
