"""The data settings: which source is read and how it is split (see `anyorder.data.prepare`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from anyorder.settings import Section, require


@dataclass(frozen=True)
class DataConfig(Section):
    source: Literal["cifar10", "cifar100", "imagefolder", "npz"] = "npz"
    # A file or directory; DVC tracks it as a dependency of `prepare` (dvc.yaml: ${data.path}).
    path: str = "data/embedded/digits.npz"
    # Images are resized to image_size x image_size; null: the model's input size (its preset's,
    # timm's for a timm name, or model.overrides.img_size): anyorder.model.spec.resolve_image_size.
    image_size: Optional[int] = None
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0
    # official: keep a source's own test set (CIFAR's; an ImageFolder's test/ or val/ folder),
    # val carved from its train set; pooled: pool everything and split it like any other.
    split: Literal["official", "pooled"] = "official"

    def check(self, key: str) -> None:
        if self.image_size is not None:
            require(self.image_size >= 4, f"{key}.image_size", "must be >= 4 (or null: the model's "
                    "input size)", self.image_size)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, f"{key}.{name}", "must be in (0, 1)", value)
        require(self.val_fraction + self.test_fraction < 1.0, f"{key}.val_fraction",
                "val_fraction + test_fraction must leave images for training (< 1)",
                self.val_fraction + self.test_fraction)
        require(bool(self.path.strip()), f"{key}.path", "must name a file or directory",
                self.path)
