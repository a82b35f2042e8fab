"""Typed, validated settings for the whole pipeline.

`params.yaml` is parsed once, here, into frozen dataclasses. Every problem (an unknown key, a
wrong type, an out-of-range value) raises `ConfigError` naming the dotted key, before any compute.
Only the standard library and PyYAML are used, so the library still runs where nothing but
torch/timm/onnx is installed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range. The message names the key."""


DATA_SOURCES = ("digits", "cifar10", "cifar100", "imagefolder", "npz")
VARIANTS = ("sequential", "ls", "ls_pos", "ls_pred")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["digits", "cifar10", "cifar100", "imagefolder", "npz"] = "digits"
    path: Optional[str] = None
    image_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0

    def check(self, key: str) -> None:
        _require(self.image_size >= 4, f"{key}.image_size", "must be >= 4", self.image_size)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _require(0.0 < value < 1.0, f"{key}.{name}", "must be in (0, 1)", value)
        _require(self.val_fraction + self.test_fraction < 1.0, f"{key}.val_fraction",
                 "val_fraction + test_fraction must leave images for training (< 1)",
                 self.val_fraction + self.test_fraction)
        if self.source != "digits":
            _require(bool(self.path), f"{key}.path",
                     f"is required for source '{self.source}' (a directory or file on disk)", self.path)


@dataclass(frozen=True)
class ModelConfig:
    # Any timm VisionTransformer name; the fields below override its defaults (null = keep timm's).
    arch: str = "vit_tiny_patch16_224"
    patch_size: Optional[int] = 8
    embed_dim: Optional[int] = 64
    depth: Optional[int] = 8
    num_heads: Optional[int] = 4
    mlp_ratio: Optional[float] = 2.0
    drop_path_rate: float = 0.0
    # "none" (from scratch), "timm" (timm's pre-trained weights; needs the hub or its cache),
    # or a path to a local .safetensors/.pth/.bin file of timm weights for `arch`.
    pretrained: str = "none"
    position_embedding_dim: int = 32  # width of the LS-pos slot table (32 in the reference code)

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
        _require(self.position_embedding_dim >= 1, f"{key}.position_embedding_dim", "must be >= 1",
                 self.position_embedding_dim)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    # Random shift augmentation: pad by this many pixels and crop back (0 = off, as in the paper).
    shift_pixels: int = 0
    # LayerShuffle order sampling: one permutation per batch (reference code) or per sample.
    order_sampling: Literal["batch", "sample"] = "batch"
    position_loss_weight: float = 1.0  # LS-pred: total = CE + weight * position CE
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def check(self, key: str) -> None:
        _require(self.epochs >= 1, f"{key}.epochs", "must be >= 1", self.epochs)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        _require(self.lr > 0, f"{key}.lr", "must be > 0", self.lr)
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.warmup_epochs < self.epochs, f"{key}.warmup_epochs",
                 f"must be in [0, epochs={self.epochs})", self.warmup_epochs)
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null", self.grad_clip)
        _require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)",
                 self.label_smoothing)
        _require(self.shift_pixels >= 0, f"{key}.shift_pixels", "must be >= 0", self.shift_pixels)
        _require(self.position_loss_weight >= 0, f"{key}.position_loss_weight", "must be >= 0",
                 self.position_loss_weight)
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"{key}.device", "must be auto, cpu, cuda or cuda:N", self.device)


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    seed: int = 0


@dataclass(frozen=True)
class FinetuneRun:
    variant: Literal["sequential", "ls", "ls_pos", "ls_pred"] = "ls"
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    runs: dict[str, FinetuneRun] = field(default_factory=lambda: {"ls": FinetuneRun()})

    def check(self, key: str) -> None:
        super().check(key)
        _require(len(self.runs) >= 1, f"{key}.runs", "needs at least one run", self.runs)
        for name in self.runs:
            _require(name.replace("_", "").replace("-", "").isalnum(), f"{key}.runs.{name}",
                     "run names may hold only letters, digits, '_' and '-' (they name files)", name)


@dataclass(frozen=True)
class EvaluateConfig:
    num_orders: int = 50
    order_seed: int = 1234
    batch_size: int = 256
    device: str = "auto"

    def check(self, key: str) -> None:
        _require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "anyorder"
    # null: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` at the project root.
    tracking_uri: Optional[str] = None


@dataclass(frozen=True)
class Settings:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def check(self) -> None:
        self.data.check("data")
        self.model.check("model", self.data.image_size)
        self.pretrain.check("pretrain")
        self.finetune.check("finetune")
        self.evaluate.check("evaluate")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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
    import copy
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        # YAML reads 1e-3 as a string (no dot); accept numeric strings, refuse anything else.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported setting type {hint!r} for {key}")  # a bug here, not user input
