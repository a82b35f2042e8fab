"""The model spec: everything needed to rebuild a model, resolved from the `model:` settings and
checked against timm, and the timm VisionTransformer it names (with pre-trained weights where
asked). Settings timm cannot build or load raise `ModelSettingsError`, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn

from anyorder.model.settings import FinetuneRun, ModelConfig
from anyorder.settings import ConfigError

# The architecture fields a params.yaml may override (null = keep timm's value).
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


class ModelSettingsError(ConfigError):
    """model.* settings that timm cannot build or load: the message names the key."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model (written as JSON beside every checkpoint)."""
    arch: str
    num_classes: int
    img_size: int
    variant: str = "sequential"
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    drop_path_rate: float = 0.0
    position_embedding_dim: int = 32
    # LS-pos: "shared", one slot table for every block (how the variant trains), or "per_block",
    # each block with the table it was trained with (a Frankenstein model of several LS-pos runs).
    slot_tables: str = "shared"
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    class_names: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def timm_kwargs(self) -> dict:
        """Keyword overrides for `timm.create_model` (None = keep the architecture's default)."""
        kwargs = {"num_classes": self.num_classes, "img_size": self.img_size, "in_chans": 3}
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


def architecture_defaults(arch: str) -> dict:
    """timm's own values of ARCH_FIELDS for `arch` (built on the meta device: no memory, no
    weights). ModelSettingsError if timm has no such model or it is not a VisionTransformer."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (see timm.list_models('vit_*'))"
        raise ModelSettingsError(f"model.arch: timm has no model named {arch!r}{hint}")
    with torch.device("meta"):
        vit = timm.create_model(arch)
    if not isinstance(vit, VisionTransformer):
        raise ModelSettingsError(f"model.arch: {arch!r} is not a timm VisionTransformer; pick a "
                                 f"vit_* or deit_* model")
    mlp = vit.blocks[0].mlp
    hidden = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_g", None)
    return {"patch_size": int(vit.patch_embed.patch_size[0]), "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks), "num_heads": int(vit.blocks[0].attn.num_heads),
            "mlp_ratio": float(hidden.out_features) / vit.embed_dim if hidden else None}


def model_spec(model: ModelConfig, image_size: int, class_names: Sequence[str],
               variant: str = "sequential") -> ModelSpec:
    """The spec of the pipeline's model: `model.arch` with its overrides, every null override
    resolved to timm's value and checked (the checks `ModelConfig.check` can only do for set
    values). Normalisation is timm's for the architecture. Raises ModelSettingsError naming the
    key."""
    import timm

    defaults = architecture_defaults(model.arch)
    resolved = {name: defaults[name] if getattr(model, name) is None else getattr(model, name)
                for name in ARCH_FIELDS}

    def source(name: str) -> str:
        return (f"model.{name}={resolved[name]}" if getattr(model, name) is not None
                else f"model.{name}=null (timm's {resolved[name]} for {model.arch})")

    if image_size % resolved["patch_size"]:
        raise ModelSettingsError(f"model.patch_size: {source('patch_size')} must divide "
                                 f"data.image_size={image_size}")
    if resolved["embed_dim"] % resolved["num_heads"]:
        raise ModelSettingsError(f"model.num_heads: {source('num_heads')} must divide "
                                 f"{source('embed_dim')}")
    cfg = timm.models.get_pretrained_cfg(model.arch)
    return ModelSpec(arch=model.arch, num_classes=len(class_names), img_size=image_size,
                     variant=variant, drop_path_rate=model.drop_path_rate,
                     mean=tuple(cfg.mean) if cfg else (0.5, 0.5, 0.5),
                     std=tuple(cfg.std) if cfg else (0.5, 0.5, 0.5),
                     class_names=list(class_names), **resolved)


def variant_spec(base: ModelSpec, run: FinetuneRun) -> ModelSpec:
    """The spec of a fine-tune run: its start model's spec with the run's variant (and knobs);
    `depth` set = a shallower model that keeps the start model's first `depth` blocks."""
    width = run.knob("position_embedding_dim")
    return dataclasses.replace(base, variant=run.variant, depth=run.depth or base.depth,
                               position_embedding_dim=width or base.position_embedding_dim)


def build_timm_vit(spec: ModelSpec, pretrained: str = "none") -> nn.Module:
    """The timm ViT named by `spec.arch` with its overrides, every block with the same stochastic
    depth rate.

    `pretrained`: "none", "timm" (timm's weights: needs the model hub or its local cache), or a
    path to a local .safetensors file of timm weights for that architecture. Problems with the
    architecture or the weights raise ModelSettingsError (a ConfigError) that names the setting,
    before any weights are trained.
    """
    import timm

    architecture_defaults(spec.arch)  # a clear error for an unknown or non-ViT name
    kwargs = spec.timm_kwargs()
    file = None
    if pretrained == "timm":
        _check_timm_weights_fit(spec)
        file = _cached_timm_safetensors(spec.arch)
        if file is None:  # not cached: timm downloads (and loads) them
            _check_timm_weights_reachable(spec.arch)
            kwargs["pretrained"] = True
    elif pretrained and pretrained != "none":
        file = Path(pretrained)
        if not file.is_file():
            raise ModelSettingsError(f"model.pretrained: no such weights file {pretrained!r}")
        if file.suffix != ".safetensors":
            raise ModelSettingsError(
                f"model.pretrained: {pretrained!r} is not a .safetensors file; this project loads "
                f"no pickles: convert it once, e.g. safetensors.torch.save_file(torch.load(f, "
                f"weights_only=True), 'weights.safetensors')")
    try:
        vit = timm.create_model(spec.arch, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        if pretrained in ("none", "", None):
            raise ModelSettingsError(f"model: timm cannot build {spec.arch} with "
                                     f"{_overrides(spec)}: {exc}") from exc
        raise ModelSettingsError(
            f"model.pretrained: timm's weights do not load into {spec.arch} with "
            f"{_overrides(spec)}: {str(exc).splitlines()[0][:300]}; set the overrides to null "
            f"to use the shapes the weights were trained with") from exc
    if file is not None:
        from anyorder.model.weights import load_timm_weights
        report = load_timm_weights(vit, file)
        fresh = f"; new (another number of classes): {', '.join(report['new'])}" \
            if report["new"] else ""
        print(f"model.pretrained: {report['loaded']} tensors from {file}{fresh}", flush=True)
    _uniform_drop_path(vit, spec.drop_path_rate)
    return vit


def _overrides(spec: ModelSpec) -> str:
    return ", ".join(f"{name}={getattr(spec, name)}" for name in ARCH_FIELDS)


def _check_timm_weights_fit(spec: ModelSpec) -> None:
    """timm's weights have timm's shapes: name the overrides that would change them."""
    defaults = architecture_defaults(spec.arch)
    changed = [f"model.{name}={getattr(spec, name)} (timm: {defaults[name]})"
               for name in ("embed_dim", "depth", "num_heads", "mlp_ratio")
               if getattr(spec, name) is not None and defaults[name] is not None
               and abs(float(getattr(spec, name)) - float(defaults[name])) > 1e-9]
    if changed:
        raise ModelSettingsError(
            f"model.pretrained: timm's weights for {spec.arch} cannot load with "
            f"{', '.join(changed)}: the pre-trained layers were trained with timm's values; set "
            f"those to null (model.patch_size and data.image_size may differ: timm resamples them)")


def _cached_timm_safetensors(arch: str) -> Optional[Path]:
    """timm's weights for `arch` as a .safetensors file in the Hugging Face cache (loaded
    strictly, like a local file), or None."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo = cfg.hf_hub_id.split("@")[0]
    for name in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else []) + ["model.safetensors"]:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and found.endswith(".safetensors"):
            return Path(found)
    return None


def _check_timm_weights_reachable(arch: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the setting, where timm would retry the hub for a minute."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelSettingsError(f"model.pretrained: timm has no pre-trained weights for {arch!r}")
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else [
            "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
            return
        host, offline = urlparse(constants.ENDPOINT).hostname, constants.HF_HUB_OFFLINE
        where = f"the Hugging Face hub ({constants.ENDPOINT}, repo {repo})"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached.is_file():
            return
        host, offline, where = urlparse(cfg.url).hostname, False, cfg.url
    reason = "HF_HUB_OFFLINE is set" if offline else _unreachable(host, timeout)
    if reason:
        raise ModelSettingsError(
            f"model.pretrained: timm's weights for {arch} are not in the local cache and {where} "
            f"cannot be reached ({reason}); download them on a connected machine (they are cached "
            f"under ~/.cache/huggingface), or put a .safetensors file in models/weights/ and set "
            f"model.pretrained to its path, or use model.pretrained: none")


def _unreachable(host: Optional[str], timeout: float) -> Optional[str]:
    """None if a TCP connection to host:443 opens within `timeout`, else why not."""
    try:
        socket.create_connection((host or "", 443), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"{host}: {exc}"


def _uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """timm's stochastic depth grows with a block's index; once blocks move, that is meaningless.

    Give every block the same rate instead (the spec: follow the slot or be uniform).
    """
    from timm.layers import DropPath
    for block in vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())
