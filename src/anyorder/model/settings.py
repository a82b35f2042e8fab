"""The model settings: the architecture (`ModelConfig`: a preset of this project or any timm ViT
name, with `ModelOverrides` on top; turned into a spec by `anyorder.model.spec.model_spec`), the
variants a model is trained as, and one fine-tune run's variant and knobs (`FinetuneRun`, read by
`anyorder.model.spec.variant_spec` and the training loop)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from anyorder.settings import ConfigError, Section, require
from anyorder.training.settings import TrainConfig

Variant = Literal["sequential", "ls", "ls_pos", "ls_pred"]
VARIANTS: tuple[str, ...] = typing.get_args(Variant)
LAYERSHUFFLE_VARIANTS = ("ls", "ls_pos", "ls_pred")


class ModelSettingsError(ConfigError):
    """model.* settings that timm cannot build or load: the message names the key."""


# The architecture fields a preset sets and `model.overrides` may change (null: the preset's or
# timm's value).
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass(frozen=True)
class Preset:
    """A named architecture of this project: the timm ViT `timm` with shapes and an input size of
    its own. No pre-trained weights have those shapes: a preset trains from scratch."""
    timm: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    def describe(self) -> str:
        return (f"timm's {self.timm} with patch_size {self.patch_size}, embed_dim "
                f"{self.embed_dim}, depth {self.depth}, num_heads {self.num_heads}, mlp_ratio "
                f"{self.mlp_ratio}, {self.img_size}x{self.img_size} images")


PRESETS: dict[str, Preset] = {
    # Trains from scratch on a CPU in minutes. 3 x 8 x 8 = 192 values per patch > embed_dim 64:
    # the patch embedding has a nullspace (the nullspace study needs one).
    "cpu_tiny": Preset(timm="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                       depth=8, num_heads=4, mlp_ratio=2.0),
}


@dataclass(frozen=True)
class ModelOverrides(Section):
    """Changes to the architecture `model.arch` names, applied on top of a preset or of timm's
    model; each key left out (or null) keeps the preset's or timm's value."""
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    img_size: Optional[int] = None      # the model's input size (data.image_size: null follows it)
    mean: Optional[list[float]] = None  # the input normalisation, per channel (R, G, B)
    std: Optional[list[float]] = None
    OPTIONAL_KEYS = ARCH_FIELDS + ("img_size", "mean", "std")

    def check(self, key: str) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None:
                require(value >= 1, f"{key}.{name}", "must be >= 1", value)
        if self.img_size is not None:
            require(self.img_size >= 4, f"{key}.img_size", "must be >= 4", self.img_size)
        if self.mlp_ratio is not None:
            require(self.mlp_ratio > 0, f"{key}.mlp_ratio", "must be > 0", self.mlp_ratio)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                require(len(value) == 3, f"{key}.{name}", "needs one value per channel (R, G, B)",
                        value)
        if self.std is not None:
            require(all(s > 0 for s in self.std), f"{key}.std", "must be > 0", self.std)


@dataclass(frozen=True)
class ModelConfig(Section):
    # A preset of this project (PRESETS: cpu_tiny) or any timm VisionTransformer name, which means
    # exactly timm's model: its shapes, input size and normalisation.
    arch: str = "cpu_tiny"
    overrides: ModelOverrides = field(default_factory=ModelOverrides)
    drop_path_rate: float = 0.0
    # "none" (from scratch), "timm" (timm's pre-trained weights; needs the hub or its cache), or
    # the path of a weights file inside models/weights/ (a dependency of the pretrain stage).
    pretrained: str = "none"

    @property
    def preset(self) -> Optional[Preset]:
        """The project preset `arch` names, or None (a timm name)."""
        return PRESETS.get(self.arch)

    @property
    def timm_arch(self) -> str:
        """The timm model: a preset's, or `arch` itself."""
        preset = self.preset
        return preset.timm if preset is not None else self.arch

    def known(self, name: str) -> Any:
        """An ARCH_FIELDS value or img_size as far as it is known without timm: the override,
        else the preset's; None where it is timm's (anyorder.model.spec asks timm)."""
        value = getattr(self.overrides, name)
        if value is None and self.preset is not None:
            value = getattr(self.preset, name)
        return value

    def origin(self, name: str, value: Any) -> str:
        """Where the value of `name` comes from, for messages."""
        if getattr(self.overrides, name) is not None:
            return f"model.overrides.{name}={value}"
        owner = f"preset {self.arch}'s" if self.preset is not None else \
            f"timm's for {self.arch}:"
        return f"model.overrides.{name}=null ({owner} {value})"

    def check(self, key: str, image_size: Optional[int]) -> None:
        """The checks that need no timm (`image_size`: data.image_size, None = the model's input
        size); anyorder.model.spec checks the values timm gives."""
        require(bool(self.arch.strip()), f"{key}.arch", f"must name a preset of this project "
                f"({', '.join(PRESETS)}) or a timm VisionTransformer", self.arch)
        self.overrides.check(f"{key}.overrides")
        require(0.0 <= self.drop_path_rate < 1.0, f"{key}.drop_path_rate", "must be in [0, 1)",
                self.drop_path_rate)
        preset = self.preset
        if preset is not None and self.pretrained != "none":
            raise ModelSettingsError(
                f"{key}.pretrained: {self.arch} is a from-scratch preset of this project "
                f"({preset.describe()}): no pre-trained weights have its shapes. To start from "
                f"{self.pretrained!r}, set {key}.arch to the timm model the weights are for (e.g. "
                f"vit_small_patch16_224; its shapes, input size and normalisation are timm's), "
                f"or set {key}.pretrained: none")
        self.check_shapes(self.known("embed_dim"), self.known("num_heads"))
        self.check_image_size(image_size, self.known("patch_size"), self.known("img_size"))

    def check_shapes(self, embed_dim: Optional[int], num_heads: Optional[int]) -> None:
        """ConfigError unless num_heads divides embed_dim (None: not known yet, unchecked)."""
        if embed_dim is None or num_heads is None or embed_dim % num_heads == 0:
            return
        name = "num_heads" if self.overrides.num_heads is not None else "embed_dim"
        raise ModelSettingsError(f"model.overrides.{name}: {self.origin('num_heads', num_heads)} "
                                 f"must divide {self.origin('embed_dim', embed_dim)}")

    def check_image_size(self, image_size: Optional[int], patch_size: Optional[int],
                         model_size: Optional[int]) -> None:
        """ConfigError unless the patch size divides the model's input size: model.overrides.
        img_size where set (images stored at another data.image_size are resized to it on the
        device, batch by batch), else data.image_size (`image_size`), else the model's own input
        size (`model_size`). None: not known yet, unchecked."""
        own = self.overrides.img_size
        if patch_size is None:
            return
        if own is None and image_size is not None:
            require(image_size % patch_size == 0, "data.image_size", f"must be divisible by the "
                    f"patch size ({self.origin('patch_size', patch_size)})", image_size)
            return
        size = own if own is not None else model_size
        if size is not None and size % patch_size:
            name = "patch_size" if self.overrides.patch_size is not None else "img_size"
            raise ModelSettingsError(
                f"model.overrides.{name}: {self.origin('patch_size', patch_size)} must divide the "
                f"model's input size ({self.origin('img_size', size)}"
                f"{'' if own is not None else '; data.image_size is null: it follows the model'})")


@dataclass(frozen=True)
class FinetuneRun(Section):
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
    # The run's own schedule length and peak learning rate (null: those of finetune.train).
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
    OPTIONAL_KEYS = tuple(KNOBS)  # left out of a params file: the variant's default

    def check(self, key: str) -> None:
        for knob, (variants, _) in self.KNOBS.items():
            value = getattr(self, knob)
            require(value is None or self.variant in variants, f"{key}.{knob}",
                    f"has no effect for variant {self.variant} (only for "
                    f"{', '.join(variants)}); remove it", value)
        if self.position_loss_weight is not None:
            require(self.position_loss_weight >= 0, f"{key}.position_loss_weight", "must be >= 0",
                    self.position_loss_weight)
        if self.position_embedding_dim is not None:
            require(self.position_embedding_dim >= 1, f"{key}.position_embedding_dim",
                    "must be >= 1", self.position_embedding_dim)
        if self.layerdrop_rate is not None:
            require(0.0 <= self.layerdrop_rate < 1.0, f"{key}.layerdrop_rate", "must be in [0, 1)",
                    self.layerdrop_rate)
            require(self.order_sampling != "sample", f"{key}.layerdrop_rate", "needs "
                    "order_sampling: batch (a dropped block is skipped for the whole batch)",
                    self.layerdrop_rate)
        require(self.layerdrop_schedule is None or self.layerdrop_rate is not None,
                f"{key}.layerdrop_schedule", "has no effect without layerdrop_rate; set both",
                self.layerdrop_schedule)
        if self.depth is not None:
            require(self.depth >= 1, f"{key}.depth", "must be >= 1", self.depth)
        if self.epochs is not None:
            require(self.epochs >= 1, f"{key}.epochs", "must be >= 1", self.epochs)
        if self.lr is not None:
            require(self.lr > 0, f"{key}.lr", "must be > 0", self.lr)

    def training(self, shared: TrainConfig) -> TrainConfig:
        """The run's training settings: the shared ones with the run's own epochs / lr."""
        own = {name: value for name in ("epochs", "lr") if (value := getattr(self, name)) is not None}
        return dataclasses.replace(shared, **own)

    def knob(self, name: str) -> Any:
        """The value of a variant knob, its default when unset (None if the variant lacks it)."""
        variants, default = self.KNOBS[name]
        if self.variant not in variants:
            return None
        value = getattr(self, name)
        return default if value is None else value
