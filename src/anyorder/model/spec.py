"""The model spec: everything needed to rebuild a model, resolved from the `model:` settings (a
project preset or a timm name, with model.overrides) and checked against timm, and the timm
VisionTransformer it names (with pre-trained weights where asked). Also the one rule for the image
size (`resolve_image_size`: data.image_size, else the model's input size). Settings timm cannot
build or load raise `ModelSettingsError`, naming the key.
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

from anyorder.model.settings import (ARCH_FIELDS, PRESETS, FinetuneRun, ModelConfig,
                                     ModelSettingsError)


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

    presets = ", ".join(PRESETS)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(PRESETS) + timm.list_models(), n=3,
                                          cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ModelSettingsError(
            f"model.arch: timm has no model named {arch!r}{hint} (model.arch takes a preset of "
            f"this project, {presets}, or any timm VisionTransformer name: see "
            f"timm.list_models('vit_*'))")
    with torch.device("meta"):
        vit = timm.create_model(arch)
    if not isinstance(vit, VisionTransformer):
        raise ModelSettingsError(f"model.arch: {arch!r} is not a timm VisionTransformer; pick a "
                                 f"vit_* or deit_* model, or a preset of this project ({presets})")
    mlp = vit.blocks[0].mlp
    hidden = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_g", None)
    return {"patch_size": int(vit.patch_embed.patch_size[0]), "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks), "num_heads": int(vit.blocks[0].attn.num_heads),
            "mlp_ratio": float(hidden.out_features) / vit.embed_dim if hidden else None}


def timm_input_size(arch: str) -> int:
    """The input size timm's pre-trained config gives `arch` (224 for vit_small_patch16_224);
    the model's own default where timm has no config."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.input_size:
        height, width = cfg.input_size[-2:]
    else:
        with torch.device("meta"):
            height, width = timm.create_model(arch).patch_embed.img_size
    if height != width:
        raise ModelSettingsError(f"model.arch: timm's {arch} takes {height}x{width} images; this "
                                 f"project's images are square: set model.overrides.img_size")
    return int(height)


def resolve_image_size(model: ModelConfig, image_size: Optional[int]) -> int:
    """The size images are prepared at and the model takes, the one rule for it: data.image_size
    (`image_size`) where set, else the model's input size: model.overrides.img_size, else the
    preset's, else timm's (its pre-trained config) for a timm name. The patch size must divide
    it. Raises ConfigError naming the key; timm is asked only for what params.yaml leaves to it.
    Reads model.arch and model.overrides only (the prepare stage declares just those)."""
    model_size = model.known("img_size")
    if model_size is None and image_size is None:
        model_size = timm_input_size(model.timm_arch)
    patch_size = model.known("patch_size")
    if patch_size is None:
        patch_size = architecture_defaults(model.timm_arch)["patch_size"]
    model.check_image_size(image_size, patch_size, model_size)
    return image_size if image_size is not None else model_size


def model_spec(model: ModelConfig, image_size: Optional[int], class_names: Sequence[str],
               variant: str = "sequential") -> ModelSpec:
    """The spec of the pipeline's model: `model.arch` (a preset, or timm's model as timm defines
    it) with model.overrides on top, every null override resolved to the preset's or timm's value
    and checked (the checks `ModelConfig.check` can only do for values it knows). `image_size`:
    the size of the prepared images (None: `resolve_image_size` with data.image_size null); the
    model takes model.overrides.img_size where that is set (prepared images of another size are
    resized to it on the device, `anyorder.data.inputs.to_model_input`), else that size.
    Normalisation: model.overrides.mean/std, else timm's for the architecture. Raises
    ModelSettingsError naming the key."""
    import timm

    arch = model.timm_arch
    defaults = architecture_defaults(arch)
    resolved = {}
    for name in ARCH_FIELDS:
        value = model.known(name)  # the override, else the preset's
        resolved[name] = defaults[name] if value is None else value
    if image_size is None:
        image_size = resolve_image_size(model, None)
    if model.overrides.img_size is not None:
        image_size = model.overrides.img_size
    if image_size % resolved["patch_size"]:
        raise ModelSettingsError(f"model.overrides.patch_size: "
                                 f"{model.origin('patch_size', resolved['patch_size'])} must "
                                 f"divide the image size {image_size} (data.image_size, or the "
                                 f"model's input size where that is null)")
    model.check_shapes(resolved["embed_dim"], resolved["num_heads"])
    cfg = timm.models.get_pretrained_cfg(arch)
    timm_mean = tuple(cfg.mean) if cfg else (0.5, 0.5, 0.5)
    timm_std = tuple(cfg.std) if cfg else (0.5, 0.5, 0.5)
    mean, std = model.overrides.mean, model.overrides.std
    return ModelSpec(arch=arch, num_classes=len(class_names), img_size=image_size,
                     variant=variant, drop_path_rate=model.drop_path_rate,
                     mean=tuple(mean) if mean is not None else timm_mean,
                     std=tuple(std) if std is not None else timm_std,
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
            f"{_overrides(spec)}: {str(exc).splitlines()[0][:300]}; set model.overrides to {{}} "
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
    changed = [f"model.overrides.{name}={getattr(spec, name)} (timm: {defaults[name]})"
               for name in ("embed_dim", "depth", "num_heads", "mlp_ratio")
               if getattr(spec, name) is not None and defaults[name] is not None
               and abs(float(getattr(spec, name)) - float(defaults[name])) > 1e-9]
    if changed:
        raise ModelSettingsError(
            f"model.pretrained: timm's weights for {spec.arch} cannot load with "
            f"{', '.join(changed)}: the pre-trained layers were trained with timm's values; set "
            f"those to null (model.overrides.patch_size, model.overrides.img_size and "
            f"data.image_size may differ: timm resamples them)")


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
