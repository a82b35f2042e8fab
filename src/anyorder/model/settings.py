"""The model settings: the architecture (`ModelConfig`, turned into a spec by
`anyorder.model.spec.model_spec`), the variants a model is trained as, and one fine-tune run's
variant and knobs (`FinetuneRun`, read by `anyorder.model.spec.variant_spec` and the training
loop)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from anyorder.settings import Section, require
from anyorder.training.settings import TrainConfig

Variant = Literal["sequential", "ls", "ls_pos", "ls_pred"]
VARIANTS: tuple[str, ...] = typing.get_args(Variant)
LAYERSHUFFLE_VARIANTS = ("ls", "ls_pos", "ls_pred")


@dataclass(frozen=True)
class ModelConfig(Section):
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
                require(value >= 1, f"{key}.{name}", "must be >= 1", value)
        if self.patch_size is not None:
            require(image_size % self.patch_size == 0, f"{key}.patch_size",
                    f"must divide data.image_size={image_size}", self.patch_size)
        if self.embed_dim is not None and self.num_heads is not None:
            require(self.embed_dim % self.num_heads == 0, f"{key}.num_heads",
                    f"must divide model.embed_dim={self.embed_dim}", self.num_heads)
        if self.mlp_ratio is not None:
            require(self.mlp_ratio > 0, f"{key}.mlp_ratio", "must be > 0", self.mlp_ratio)
        require(0.0 <= self.drop_path_rate < 1.0, f"{key}.drop_path_rate", "must be in [0, 1)",
                self.drop_path_rate)
        require(bool(self.arch.strip()), f"{key}.arch", "must name a timm model", self.arch)


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
