"""Typed, validated settings for the whole pipeline.

`params.yaml` is parsed once, here, into frozen dataclasses. Every problem (an unknown key, a
wrong type, a number that is not finite, an out-of-range value) raises `ConfigError` naming the
dotted key, before any compute. Only the standard library and PyYAML are used, so the library
still runs where nothing but torch/timm/onnx is installed.

Settings also know which of their keys were read. A pipeline stage calls
`settings.restrict_to(declared)` with the params its DVC stage declares; from then on, reading a
key outside them raises `UndeclaredParamError`. DVC reruns a stage only when a declared param
changes, so a stage that read an undeclared one would silently keep stale outputs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from anyorder.errors import InputError


class ConfigError(InputError):
    """A setting is unknown, of the wrong type or out of range. The message names the key."""


class UndeclaredParamError(RuntimeError):
    """A stage read a setting its DVC stage does not declare (a bug in dvc.yaml or the stage)."""


Variant = Literal["sequential", "ls", "ls_pos", "ls_pred"]
VARIANTS: tuple[str, ...] = typing.get_args(Variant)
LAYERSHUFFLE_VARIANTS = ("ls", "ls_pos", "ls_pred")
# anyorder.robustness.corruptions.CORRUPTIONS, repeated here so that settings load without torch
# (tests/test_robustness.py checks the two agree).
CORRUPTION_NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                    "elastic_transform", "pixelate", "jpeg_compression")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# -- access tracking ---------------------------------------------------------------------------

class _AccessLog:
    """The keys read from one Settings object, checked against the keys a stage declared."""

    def __init__(self, stage: str, declared: list[str]):
        self.stage, self.declared, self.read = stage, list(declared), set()

    def record(self, key: str) -> None:
        self.read.add(key)
        if not any(key == d or key.startswith(d + ".") for d in self.declared):
            raise UndeclaredParamError(
                f"stage {self.stage} reads the setting {key}, which its entry in dvc.yaml does not "
                f"list under params (declared: {', '.join(self.declared) or 'none'}); add it there, "
                f"or DVC will not rerun the stage when it changes")


class _Section:
    """Base of every settings section: leaf reads are recorded once a stage restricts them."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if not name.startswith("_") and name in type(self).__dataclass_fields__:
            log = object.__getattribute__(self, "__dict__").get("_log")
            if log is not None and not isinstance(value, (_Section, _Entries)):
                log.record(f"{object.__getattribute__(self, '_key')}.{name}")
        return value

    def _attach(self, log: _AccessLog, key: str) -> None:
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_key", key)
        for f in dataclasses.fields(self):
            value = object.__getattribute__(self, f.name)
            if isinstance(value, (_Section, _Entries)):
                value._attach(log, f"{key}.{f.name}" if key else f.name)


class _Entries(dict):
    """A mapping of named entries (finetune.runs, export.models): reading one entry records that
    entry; listing them records all of them."""

    _log: Optional[_AccessLog] = None
    _key = ""

    def _attach(self, log: _AccessLog, key: str) -> None:
        self._log, self._key = log, key
        for name, run in dict.items(self):
            run._attach(log, f"{key}.{name}")

    def _all(self) -> None:
        if self._log is not None:
            self._log.record(self._key)

    def __contains__(self, name: object) -> bool:
        if self._log is not None:
            self._log.record(f"{self._key}.{name}")
        return dict.__contains__(self, name)

    def __iter__(self):
        self._all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._all()
        return dict.__len__(self)

    def keys(self):
        self._all()
        return dict.keys(self)

    def values(self):
        self._all()
        return dict.values(self)

    def items(self):
        self._all()
        return dict.items(self)


# -- sections ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig(_Section):
    source: Literal["cifar10", "cifar100", "imagefolder", "npz"] = "npz"
    # A file or directory; DVC tracks it as a dependency of `prepare` (dvc.yaml: ${data.path}).
    path: str = "data/embedded/digits.npz"
    image_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0
    # official: keep a source's own test set (CIFAR's; an ImageFolder's test/ or val/ folder),
    # val carved from its train set; pooled: pool everything and split it like any other.
    split: Literal["official", "pooled"] = "official"

    def check(self, key: str) -> None:
        _require(self.image_size >= 4, f"{key}.image_size", "must be >= 4", self.image_size)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _require(0.0 < value < 1.0, f"{key}.{name}", "must be in (0, 1)", value)
        _require(self.val_fraction + self.test_fraction < 1.0, f"{key}.val_fraction",
                 "val_fraction + test_fraction must leave images for training (< 1)",
                 self.val_fraction + self.test_fraction)
        _require(bool(self.path.strip()), f"{key}.path", "must name a file or directory",
                 self.path)


@dataclass(frozen=True)
class ModelConfig(_Section):
    # Any timm VisionTransformer name; the fields below override its defaults (null = keep timm's).
    arch: str = "vit_tiny_patch16_224"
    patch_size: Optional[int] = 8
    embed_dim: Optional[int] = 64
    depth: Optional[int] = 8
    num_heads: Optional[int] = 4
    mlp_ratio: Optional[float] = 2.0
    drop_path_rate: float = 0.0
    # "none" (from scratch), "timm" (timm's pre-trained weights; needs the hub or its cache), or
    # the path of a weights file inside models/weights/ (a dependency of the pretrain stage).
    pretrained: str = "none"

    def check(self, key: str, image_size: int) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None:
                _require(value >= 1, f"{key}.{name}", "must be >= 1", value)
        if self.patch_size is not None:
            _require(image_size % self.patch_size == 0, f"{key}.patch_size",
                     f"must divide data.image_size={image_size}", self.patch_size)
        if self.embed_dim is not None and self.num_heads is not None:
            _require(self.embed_dim % self.num_heads == 0, f"{key}.num_heads",
                     f"must divide model.embed_dim={self.embed_dim}", self.num_heads)
        if self.mlp_ratio is not None:
            _require(self.mlp_ratio > 0, f"{key}.mlp_ratio", "must be > 0", self.mlp_ratio)
        _require(0.0 <= self.drop_path_rate < 1.0, f"{key}.drop_path_rate", "must be in [0, 1)",
                 self.drop_path_rate)
        _require(bool(self.arch.strip()), f"{key}.arch", "must name a timm model", self.arch)


@dataclass(frozen=True)
class TrainConfig(_Section):
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
        _require(self.epochs >= 1, f"{key}.epochs", "must be >= 1", self.epochs)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        _require(self.nproc >= 1, f"{key}.nproc", "must be >= 1", self.nproc)
        _require(self.batch_size >= self.nproc, f"{key}.batch_size",
                 f"must be >= nproc ({self.nproc}): every process needs images", self.batch_size)
        _require(self.order_scope in ("shared", "rank"), f"{key}.order_scope",
                 "must be shared or rank", self.order_scope)
        _require(self.lr > 0, f"{key}.lr", "must be > 0", self.lr)
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.warmup_epochs < self.epochs, f"{key}.warmup_epochs",
                 f"must be in [0, epochs={self.epochs})", self.warmup_epochs)
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null", self.grad_clip)
        _require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)",
                 self.label_smoothing)
        _require(self.shift_pixels >= 0, f"{key}.shift_pixels", "must be >= 0", self.shift_pixels)
        check_device(self.device, f"{key}.device")

    def training(self) -> "TrainConfig":
        """Just the shared training fields (reads each of them, nothing else of a subclass)."""
        return TrainConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(TrainConfig)})


@dataclass(frozen=True)
class ComputeConfig(_Section):
    """How much of the machine one stage process takes."""
    # torch and ONNX Runtime threads (0: all cores, shared evenly between torchrun's processes).
    # Two stages side by side on 2 cores (dvc exp queue --jobs 2, Prefect) thrash unless each
    # gets threads: 1.
    threads: int = 0

    def check(self, key: str) -> None:
        _require(self.threads >= 0, f"{key}.threads", "must be >= 0 (0: all cores)", self.threads)


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    seed: int = 0


@dataclass(frozen=True)
class FinetuneRun(_Section):
    """One fine-tune: a variant, a seed, and the knobs only some variants have (null = default)."""
    variant: Variant = "ls"
    seed: int = 0
    # LayerShuffle variants: one permutation per batch (reference code) or one per sample.
    order_sampling: Optional[Literal["batch", "sample"]] = None
    position_loss_weight: Optional[float] = None   # ls_pred: loss = CE + weight * position CE
    position_embedding_dim: Optional[int] = None   # ls_pos: width of the slot table (ref. code 32)
    # LayerDrop (Fan et al. 2019): each batch, the block at execution slot s is skipped with
    # probability rate (uniform) or rate * (s + 1) / depth (linear); the order is kept.
    layerdrop_rate: Optional[float] = None
    layerdrop_schedule: Optional[Literal["uniform", "linear"]] = None
    # A shallower model: the start model's first `depth` blocks, trained at that depth.
    depth: Optional[int] = None
    # The run's own schedule length and peak learning rate (null: finetune.epochs / finetune.lr).
    # LayerShuffle has more to learn than a sequential fine-tune (every block at every slot).
    epochs: Optional[int] = None
    lr: Optional[float] = None

    # knob -> (variants it applies to, its default)
    KNOBS: typing.ClassVar[dict[str, tuple[tuple[str, ...], Any]]] = {
        "order_sampling": (LAYERSHUFFLE_VARIANTS, "batch"),
        "position_loss_weight": (("ls_pred",), 1.0),
        "position_embedding_dim": (("ls_pos",), 32),
        "layerdrop_rate": (VARIANTS, 0.0),
        "layerdrop_schedule": (VARIANTS, "uniform"),
        "depth": (VARIANTS, None),
        "epochs": (VARIANTS, None),
        "lr": (VARIANTS, None),
    }

    def check(self, key: str) -> None:
        for knob, (variants, _) in self.KNOBS.items():
            value = getattr(self, knob)
            _require(value is None or self.variant in variants, f"{key}.{knob}",
                     f"has no effect for variant {self.variant} (only for "
                     f"{', '.join(variants)}); remove it", value)
        if self.position_loss_weight is not None:
            _require(self.position_loss_weight >= 0, f"{key}.position_loss_weight", "must be >= 0",
                     self.position_loss_weight)
        if self.position_embedding_dim is not None:
            _require(self.position_embedding_dim >= 1, f"{key}.position_embedding_dim",
                     "must be >= 1", self.position_embedding_dim)
        if self.layerdrop_rate is not None:
            _require(0.0 <= self.layerdrop_rate < 1.0, f"{key}.layerdrop_rate", "must be in [0, 1)",
                     self.layerdrop_rate)
            _require(self.order_sampling != "sample", f"{key}.layerdrop_rate", "needs "
                     "order_sampling: batch (a dropped block is skipped for the whole batch)",
                     self.layerdrop_rate)
        _require(self.layerdrop_schedule is None or self.layerdrop_rate is not None,
                 f"{key}.layerdrop_schedule", "has no effect without layerdrop_rate; set both",
                 self.layerdrop_schedule)
        if self.depth is not None:
            _require(self.depth >= 1, f"{key}.depth", "must be >= 1", self.depth)
        if self.epochs is not None:
            _require(self.epochs >= 1, f"{key}.epochs", "must be >= 1", self.epochs)
        if self.lr is not None:
            _require(self.lr > 0, f"{key}.lr", "must be > 0", self.lr)

    def training(self, shared: "TrainConfig") -> "TrainConfig":
        """The run's training settings: the shared ones with the run's own epochs / lr."""
        own = {name: value for name in ("epochs", "lr") if (value := getattr(self, name)) is not None}
        return dataclasses.replace(shared.training(), **own)

    def knob(self, name: str) -> Any:
        """The value of a variant knob, its default when unset (None if the variant lacks it)."""
        variants, default = self.KNOBS[name]
        if self.variant not in variants:
            return None
        value = getattr(self, name)
        return default if value is None else value


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    runs: dict[str, FinetuneRun] = field(default_factory=lambda: {
        "sequential": FinetuneRun(variant="sequential"), "ls": FinetuneRun()})

    def check(self, key: str) -> None:
        super().check(key)
        _require(len(self.runs) >= 1, f"{key}.runs", "needs at least one run", self.runs)
        for name, run in self.runs.items():
            _check_name(name, f"{key}.runs.{name}")
            run.check(f"{key}.runs.{name}")
            if run.epochs is not None:  # the shared warm-up must fit the run's own schedule
                _require(self.warmup_epochs < run.epochs, f"{key}.runs.{name}.epochs",
                         f"must be > finetune.warmup_epochs ({self.warmup_epochs})", run.epochs)


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    num_orders: int = 50
    order_seed: int = 1234
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        _require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class SelectConfig(_Section):
    """The best run of one variant, chosen on the validation split (never the test split)."""
    name: str = "ls_best"            # written to models/selected/<name>
    variant: Variant = "ls"
    num_orders: int = 20             # seeded random orders each candidate is scored over
    order_seed: int = 4321
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        _check_name(self.name, f"{key}.name")
        _require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class ExportModel(_Section):
    model: str = ""                  # a model directory the pipeline wrote
    metrics: str = ""                # its evaluation (metrics/evaluate/<run>.json)


@dataclass(frozen=True)
class ExportConfig(_Section):
    # The TorchScript-based exporter writes opsets 14..20 (17 brings LayerNormalization).
    opset: int = 17
    check_orders: int = 10           # seeded random orders the chained graphs are checked in
    check_seed: int = 0
    models: dict[str, ExportModel] = field(default_factory=lambda: {
        "sequential": ExportModel("models/finetune/sequential", "metrics/evaluate/sequential.json"),
        "ls_best": ExportModel("models/selected/ls_best", "models/selected/ls_best/evaluate.json"),
        "ls_pos": ExportModel("models/finetune/ls_pos", "metrics/evaluate/ls_pos.json")})

    def check(self, key: str) -> None:
        _require(14 <= self.opset <= 20, f"{key}.opset", "must be in 14..20 (what the exporter "
                 "writes)", self.opset)
        _require(self.check_orders >= 1, f"{key}.check_orders", "must be >= 1", self.check_orders)
        for name, entry in self.models.items():
            _check_name(name, f"{key}.models.{name}")
            for field_name in ("model", "metrics"):
                _require(bool(getattr(entry, field_name).strip()), f"{key}.models.{name}."
                         f"{field_name}", "must name a path the pipeline writes",
                         getattr(entry, field_name))


@dataclass(frozen=True)
class Gates(_Section):
    """Quality gates: the registry alias moves only to a version that passes all of them."""
    min_sequential_accuracy: float = 0.0
    min_arbitrary_accuracy: float = 0.9   # mean test accuracy over the evaluated random orders
    max_export_error: float = 1e-4        # worst |ONNX - PyTorch| of logits found by the export

    def check(self, key: str) -> None:
        for name in ("min_sequential_accuracy", "min_arbitrary_accuracy"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"{key}.{name}", "must be in [0, 1]",
                     getattr(self, name))
        _require(self.max_export_error > 0, f"{key}.max_export_error", "must be > 0",
                 self.max_export_error)


@dataclass(frozen=True)
class RegisterConfig(_Section):
    model_name: str = "anyorder-vit"      # the registered model in the MLflow registry
    export: str = "ls_best"               # which entry of export.models to register
    alias: str = "champion"               # moved to the new version only if the gates pass
    gates: Gates = field(default_factory=Gates)

    def check(self, key: str, exports: dict) -> None:
        _require(self.export in exports, f"{key}.export", f"must name an entry of export.models "
                 f"({', '.join(exports) or 'none'})", self.export)
        _require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name) is not None,
                 f"{key}.model_name", "use letters, digits, '.', '_' and '-'", self.model_name)
        _require(re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", self.alias) is not None,
                 f"{key}.alias", "use letters, digits, '_' and '-', starting with a letter",
                 self.alias)
        self.gates.check(f"{key}.gates")


@dataclass(frozen=True)
class SynthesisConfig(_Section):
    """Approximate-nullspace noise synthesis (spec section 2; anyorder.robustness.nullspace.synthesize_noise).
    The optimiser is AdamW on the noise alone."""
    lim: float = 3.0              # start: Uniform(-lim, lim) on every element of the noise
    lr: float = 0.1               # AdamW's learning rate
    weight_decay: float = 0.0     # AdamW's weight decay on the noise (0: it would shrink the noise)
    epsilon: float = 0.01         # stop once the mean squared L2 distance of softmax outputs < it
    steps: int = 2000             # budget: optimiser steps at most
    batch_size: int = 64          # training images per step, drawn at random from the whole split
    check_images: int = 512       # training images a stop is confirmed on (all, if fewer)
    log_norm_weight: float = 0.0  # lambda of the optional -lambda * log||v|| term (code: 0)
    require_convergence: bool = True  # a fine-tune whose synthesis misses epsilon stops, failed

    def check(self, key: str) -> None:
        for name in ("lim", "lr", "epsilon"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0", getattr(self, name))
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0", self.weight_decay)
        for name in ("steps", "batch_size", "check_images"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1",
                     getattr(self, name))
        _require(self.log_norm_weight >= 0, f"{key}.log_norm_weight", "must be >= 0",
                 self.log_norm_weight)


@dataclass(frozen=True)
class NullspaceArm(_Section):
    """One nullspace fine-tuning arm: a start model, the noise it trains against, a seed."""
    start: str = "models/finetune/sequential"   # a model directory the pipeline writes
    noise: Literal["nullspace", "random", "none"] = "nullspace"
    seed: int = 0


@dataclass(frozen=True)
class NullspaceConfig(TrainConfig):
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    arms: dict[str, NullspaceArm] = field(default_factory=lambda: {"seq_null": NullspaceArm()})
    # Arms only the study (pipeline/study.py, `make study`) runs, beside `arms`: no stage reads it.
    study_arms: dict[str, NullspaceArm] = field(default_factory=dict)

    def check(self, key: str) -> None:
        super().check(key)
        self.synthesis.check(f"{key}.synthesis")
        for section, arms in (("arms", self.arms), ("study_arms", self.study_arms)):
            for name, arm in arms.items():
                _check_name(name, f"{key}.{section}.{name}")
                _require(bool(arm.start.strip()), f"{key}.{section}.{name}.start",
                         "must name a model directory the pipeline writes", arm.start)


@dataclass(frozen=True)
class CorruptionConfig(_Section):
    names: list[str] = field(default_factory=lambda: list(CORRUPTION_NAMES))
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    seed: int = 0

    def check(self, key: str) -> None:
        for name in self.names:
            _require(name in CORRUPTION_NAMES, f"{key}.names", f"unknown corruption (known: "
                     f"{', '.join(CORRUPTION_NAMES)})", name)
        _require(len(set(self.names)) == len(self.names) and self.names, f"{key}.names",
                 "must list each corruption once, at least one", self.names)
        for severity in self.severities:
            _require(severity in (1, 2, 3, 4, 5), f"{key}.severities", "must be in 1..5",
                     severity)
        _require(len(set(self.severities)) == len(self.severities) and self.severities,
                 f"{key}.severities", "must list each severity once, at least one",
                 self.severities)


@dataclass(frozen=True)
class AttackConfig(_Section):
    names: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    # L-infinity budgets on pixels in [0, 1]: 1/255, 2/255, 4/255, 8/255
    eps: list[float] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    pgd_steps: int = 10
    pgd_step_size: float = 2.5    # PGD's step = this x eps / pgd_steps (Madry et al.)
    pgd_random_start: bool = True
    seed: int = 0

    def check(self, key: str) -> None:
        for name in self.names:
            _require(name in ("fgsm", "pgd"), f"{key}.names", "unknown attack (known: fgsm, pgd)",
                     name)
        _require(bool(self.names), f"{key}.names", "must list at least one attack", self.names)
        for eps in self.eps:
            _require(0 < eps <= 1, f"{key}.eps", "every budget must be in (0, 1] (pixels are in "
                     "[0, 1]: 8/255 = 0.0314)", eps)
        _require(bool(self.eps), f"{key}.eps", "must list at least one budget", self.eps)
        _require(self.pgd_steps >= 1, f"{key}.pgd_steps", "must be >= 1", self.pgd_steps)
        _require(self.pgd_step_size > 0, f"{key}.pgd_step_size", "must be > 0",
                 self.pgd_step_size)


@dataclass(frozen=True)
class RobustnessConfig(_Section):
    """Robustness of every model the pipeline trains (evaluate@<run> and nullspace@<arm>)."""
    corruptions: CorruptionConfig = field(default_factory=CorruptionConfig)
    attacks: AttackConfig = field(default_factory=AttackConfig)
    # Corruptions and attacks run on this many test images (a seeded subset; null = all of them).
    num_images: Optional[int] = None
    subset_seed: int = 0
    num_orders: int = 8              # LS models: random orders, each test image runs in one
    order_seed: int = 777
    noise_seed: int = 0              # exact nullspace noise and the synthesised noise
    exact_rtol: Optional[float] = None  # rank tolerance factor (null: max(D, C*P*P) * eps)
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        self.corruptions.check(f"{key}.corruptions")
        self.attacks.check(f"{key}.attacks")
        if self.num_images is not None:
            _require(self.num_images >= 1, f"{key}.num_images", "must be >= 1 or null",
                     self.num_images)
        _require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        if self.exact_rtol is not None:
            _require(0 < self.exact_rtol < 1, f"{key}.exact_rtol", "must be in (0, 1) or null",
                     self.exact_rtol)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class PruningConfig(_Section):
    """Test-time pruning curves of every evaluated model (evaluate@<run>, merge@<name>)."""
    subsets: int = 20                # seeded kept-block choices (and orders) per number removed
    seed: int = 99
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        _require(self.subsets >= 1, f"{key}.subsets", "must be >= 1", self.subsets)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class MergeModel(_Section):
    """One Frankenstein model: a recipe generator and its sources (model directories)."""
    generator: Literal["random", "greedy", "manual"] = "random"
    sources: list[str] = field(default_factory=list)
    base: Optional[str] = None       # stem/head source; null: the first (random), best (greedy)
    seed: int = 0
    recipe: Optional[str] = None     # manual: a recipe file (its sources replace `sources`)

    def check(self, key: str) -> None:
        if self.generator == "manual":
            _require(bool(self.recipe), f"{key}.recipe", "the manual generator needs a recipe "
                     "file (e.g. models/recipes/<name>.yaml)", self.recipe)
            return
        _require(self.recipe is None, f"{key}.recipe", f"only the manual generator reads a "
                 f"recipe file, not {self.generator}; remove it", self.recipe)
        _require(len(self.sources) >= 2, f"{key}.sources", "needs at least two model "
                 "directories", self.sources)
        names = [Path(s).name for s in self.sources]
        _require(len(set(names)) == len(names), f"{key}.sources", "the directories must have "
                 "distinct names (they name the sources in the recipe)", self.sources)
        _require(self.base is None or self.base in self.sources, f"{key}.base",
                 "must be one of the sources, or null", self.base)


@dataclass(frozen=True)
class MergeConfig(_Section):
    num_orders: int = 20             # validation orders the greedy rule and the card score over
    order_seed: int = 2468
    batch_size: int = 256
    device: str = "auto"
    models: dict[str, MergeModel] = field(default_factory=dict)

    def check(self, key: str) -> None:
        _require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")
        for name, entry in self.models.items():
            _check_name(name, f"{key}.models.{name}")
            entry.check(f"{key}.models.{name}")


@dataclass(frozen=True)
class AnalysisConfig(_Section):
    """How blocks behave at the slot they run at (the analysis stage)."""
    models: list[str] = field(default_factory=list)  # model directories analysed
    block: int = 0                   # the block whose output is projected, run at every slot
    projection: Literal["umap", "pca"] = "pca"
    num_images: int = 200            # test images (a seeded subset) for the projection
    num_orders: int = 20             # random orders the per-slot contribution averages over
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        _require(self.block >= 0, f"{key}.block", "must be >= 0", self.block)
        for name in ("num_images", "num_orders", "batch_size"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1",
                     getattr(self, name))
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class ReportConfig(_Section):
    """The report stage: which run every other is compared with."""
    baseline: str = "sequential"  # a run of finetune.runs (the denominator of the headline)

    def check(self, key: str, runs: dict) -> None:
        _require(self.baseline in runs, f"{key}.baseline", f"must name a run of finetune.runs "
                 f"({', '.join(runs)})", self.baseline)


@dataclass(frozen=True)
class MlflowConfig(_Section):
    experiment: str = "anyorder"
    # null: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` at the project root.
    tracking_uri: Optional[str] = None


@dataclass(frozen=True)
class Settings(_Section):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    nullspace: NullspaceConfig = field(default_factory=NullspaceConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def check(self) -> None:
        self.compute.check("compute")
        self.data.check("data")
        self.model.check("model", self.data.image_size)
        self.pretrain.check("pretrain")
        self.finetune.check("finetune")
        self.evaluate.check("evaluate")
        self.select.check("select")
        self.export.check("export")
        self.register.check("register", self.export.models)
        self.nullspace.check("nullspace")
        self.robustness.check("robustness")
        self.pruning.check("pruning")
        self.merge.check("merge")
        self.analysis.check("analysis")
        self.report.check("report", self.finetune.runs)

    def restrict_to(self, declared: list[str], stage: str) -> "Settings":
        """From now on, reading a key outside `declared` (dotted prefixes) raises
        UndeclaredParamError naming `stage`. Returns self."""
        self._attach(_AccessLog(stage, declared), "")
        return self

    def keys_read(self) -> set[str]:
        """The dotted keys read since `restrict_to` (empty before)."""
        log = object.__getattribute__(self, "__dict__").get("_log")
        return set(log.read) if log else set()


# -- loading -----------------------------------------------------------------------------------

def check_device(name: str, key: str) -> None:
    """ConfigError unless `name` is auto, cpu, cuda or cuda:N (whether it exists is checked by
    `anyorder.device.resolve_device`, which needs torch)."""
    _require(_DEVICE.fullmatch(name) is not None, key, "must be auto, cpu, cuda or cuda:N", name)


def load_settings(path: str | Path = "params.yaml", overrides: Optional[dict[str, Any]] = None
                  ) -> Settings:
    """Read a params file into validated `Settings`; raise `ConfigError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such parameters file (run from the project root, or pass "
                          f"the path of your params.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return settings_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def settings_from_dict(raw: Any, overrides: Optional[dict[str, Any]] = None) -> Settings:
    """Build validated `Settings` from a nested dict (plus optional dotted-key overrides)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = _apply_overrides(raw, overrides or {})
    settings = _build(Settings, raw, "")
    settings.check()
    return settings


def _apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node[leaf] = value
    return raw


def _check_name(name: str, key: str) -> None:
    _require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) is not None, key,
             "names may hold only letters, digits, '_' and '-' (they name files)", name)


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}, got {value!r}")


def _build(cls: type, raw: Any, key: str) -> Any:
    where = key or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys here: "
                          f"{', '.join(sorted(known))})")
    values = {name: _coerce(hints[name], raw[name], f"{key}.{name}" if key else name)
              for name in known if name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        return _Entries({str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()})
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        return _finite_number(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported setting type {hint!r} for {key}")  # a bug here, not user input


def _finite_number(value: Any, key: str) -> float:
    """A YAML number (or numeric string: YAML reads 1e-3 as one) that is neither NaN nor inf."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number
