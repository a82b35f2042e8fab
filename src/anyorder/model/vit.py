"""A LayerShuffle wrapper around timm's VisionTransformer.

The wrapped timm model is used as is (never forked). What changes is how its blocks are called:
`forward_layers(tokens, execution_order)` runs the blocks listed in `execution_order`, in that
order; a shorter list is a pruned model. Training, evaluation, pruning, merging and export all go
through that one path.

Variants (spec section 1):
- ``sequential``: the baseline; trained in order 0..L-1.
- ``ls``: blocks run in a random order each batch; nothing else changes.
- ``ls_pos``: each block gets an adapter told the slot it runs at:
  ``h = h + GELU(Linear(LayerNorm(concat(h, E[slot]))))`` with one shared table E (L x 32).
- ``ls_pred``: each block owns a head (LayerNorm, Linear(dim -> L)) that predicts, from its
  mean-pooled output, the slot it ran at; trained with cross-entropy next to the class loss.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from anyorder.config import VARIANTS, ConfigError, FinetuneRun, ModelConfig

# Which variants are trained with shuffled orders. A registry, not an if-chain.
SHUFFLED_TRAINING = {"sequential": False, "ls": True, "ls_pos": True, "ls_pred": True}
# The state-dict prefixes of what a variant adds to timm's ViT (new at the start of a fine-tune).
VARIANT_PARTS = {"sequential": (), "ls": (),
                 "ls_pos": ("slot_table", "block_slot_tables", "slot_adapters."),
                 "ls_pred": ("position_heads.",)}
SLOT_TABLES = ("shared", "per_block")  # LS-pos: one table for all blocks, or one per block
# The architecture fields a params.yaml may override (null = keep timm's value).
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


class ModelSettingsError(ConfigError):
    """model.* settings that timm cannot build or load: the message names the key."""


ExecutionOrder = Union[Sequence[int], torch.Tensor]


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


class SlotAdapter(nn.Module):
    """LS-pos adapter: tells a block which execution slot it runs at.

    The Linear starts at zero so that the adapter is the identity when fine-tuning begins
    (GELU(0) = 0): an LS-pos fine-tune starts exactly from the pre-trained model instead of from a
    randomly perturbed one. The reference code initialises only the table at zero.
    """

    def __init__(self, dim: int, position_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim + position_dim)
        self.proj = nn.Linear(dim + position_dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, slot_embedding: torch.Tensor) -> torch.Tensor:
        # slot_embedding: (P,) shared by the batch, or (N, P) one per sample.
        if slot_embedding.dim() == 1:
            slot_embedding = slot_embedding.expand(tokens.shape[0], -1)
        broadcast = slot_embedding[:, None, :].expand(-1, tokens.shape[1], -1)
        return tokens + F.gelu(self.proj(self.norm(torch.cat([tokens, broadcast], dim=-1))))


class PositionHead(nn.Module):
    """LS-pred head: predicts the execution slot from a block's mean-pooled output tokens."""

    def __init__(self, dim: int, num_slots: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_slots)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(tokens.mean(dim=1)))


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    # LS-pred only: (num_slots_run, N, L) position logits, and the slots they should predict.
    position_logits: Optional[torch.Tensor] = None
    position_targets: Optional[torch.Tensor] = None


class AnyOrderViT(nn.Module):
    """timm VisionTransformer whose blocks run in an explicit execution order.

    Inputs are normalised images (N, 3, H, W). An execution order is a list of block indices
    (distinct, each in [0, depth)); one list is shared by the batch, or a (N, k) integer tensor
    gives one order per sample. The default order is sequential.
    """

    def __init__(self, vit: nn.Module, spec: ModelSpec):
        super().__init__()
        if spec.variant not in VARIANTS:
            raise ValueError(f"unknown variant {spec.variant!r}; known: {', '.join(VARIANTS)}")
        self.vit = vit
        self.spec = spec
        self.depth = len(vit.blocks)
        dim = vit.embed_dim
        if spec.slot_tables not in SLOT_TABLES:
            raise ValueError(f"unknown slot_tables {spec.slot_tables!r}; known: "
                             f"{', '.join(SLOT_TABLES)}")
        if spec.variant == "ls_pos":
            width = spec.position_embedding_dim
            if spec.slot_tables == "per_block":
                self.block_slot_tables = nn.Parameter(torch.zeros(self.depth, self.depth, width))
            else:
                self.slot_table = nn.Parameter(torch.zeros(self.depth, width))
            self.slot_adapters = nn.ModuleList(SlotAdapter(dim, width) for _ in range(self.depth))
        if spec.variant == "ls_pred":
            self.position_heads = nn.ModuleList(PositionHead(dim, self.depth)
                                                for _ in range(self.depth))

    # -- timm's vocabulary, split where our extensions need a seam --------------------------------
    @property
    def variant(self) -> str:
        return self.spec.variant

    def sequential_order(self) -> list[int]:
        return list(range(self.depth))

    def use_fused_attention(self, enabled: bool) -> None:
        """Attention through F.scaled_dot_product_attention (timm's `fused_attn`) or timm's plain
        form (two batched matmuls and a softmax): the same function, other kernels. Training on
        CPU takes the plain form: PyTorch's CPU flash-attention backward is the largest single
        cost for a few dozen tokens, and the plain form trains 1.5x faster (bench/train_bench.py)."""
        for module in self.vit.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = enabled

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) -> patch tokens (N, num_patches, D), before class token and position."""
        return self.vit.patch_embed(images)

    def forward_stem(self, images: torch.Tensor,
                     patch_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images -> tokens entering the first block (N, T, D).

        `patch_noise` (num_patches, D) or (N, num_patches, D) is added to the patch tokens right
        after the patch embedding, before class token and position embedding (nullspace noise).
        """
        tokens = self.embed_patches(images)
        if patch_noise is not None:
            if patch_noise.dim() not in (2, 3) or patch_noise.shape[-2:] != tokens.shape[-2:]:
                raise ValueError(f"patch_noise of shape {tuple(patch_noise.shape)} does not fit "
                                 f"the patch tokens {tuple(tokens.shape[-2:])} of this model; "
                                 f"give (num_patches, D) or (N, num_patches, D)")
            tokens = tokens + patch_noise
        tokens = self.vit._pos_embed(tokens)
        tokens = self.vit.patch_drop(tokens)
        return self.vit.norm_pre(tokens)

    def forward_layers(self, tokens: torch.Tensor, execution_order: Optional[ExecutionOrder] = None,
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks in `execution_order`; return the tokens and the LS-pred position logits.

        The position logits list has one (N, depth) tensor per slot run (empty unless ls_pred).
        """
        order = self.check_order(execution_order, tokens.shape[0])
        position_logits: list[torch.Tensor] = []
        if order.dim() == 1:
            for slot, block_index in enumerate(order.tolist()):
                tokens = self.run_block(tokens, block_index, slot)
                if self.variant == "ls_pred":
                    position_logits.append(self.position_heads[block_index](tokens))
            return tokens, position_logits
        # One order per sample: at each slot, group the samples by the block they run.
        # Results are gathered in buffers of the dtype the blocks return: under autocast a block
        # or head may return bf16 for fp32 tokens, and index assignment needs equal dtypes.
        batch = tokens.shape[0]
        for slot in range(order.shape[1]):
            column = order[:, slot]
            new_tokens: Optional[torch.Tensor] = None
            slot_logits: Optional[torch.Tensor] = None
            for block_index in column.unique().tolist():
                rows = (column == block_index).nonzero(as_tuple=True)[0]
                out = self.run_block(tokens[rows], block_index, slot)
                if new_tokens is None:
                    new_tokens = out.new_empty((batch, *out.shape[1:]))
                new_tokens[rows] = out
                if self.variant == "ls_pred":
                    head_out = self.position_heads[block_index](out)
                    if slot_logits is None:
                        slot_logits = head_out.new_empty((batch, head_out.shape[1]))
                    slot_logits[rows] = head_out
            tokens = new_tokens
            if slot_logits is not None:
                position_logits.append(slot_logits)
        return tokens, position_logits

    def run_block(self, tokens: torch.Tensor, block_index: int, slot: int) -> torch.Tensor:
        """One block at one execution slot (the slot matters to LS-pos only)."""
        if self.variant == "ls_pos":
            tokens = self.slot_adapters[block_index](tokens, self.slot_embedding(block_index, slot))
        return self.vit.blocks[block_index](tokens)

    def slot_embedding(self, block_index: int, slot) -> torch.Tensor:
        """LS-pos: the row of the slot table that block `block_index` reads at execution slot
        `slot` (the shared table, or the block's own in a model of per-block tables)."""
        if self.spec.slot_tables == "per_block":
            return self.block_slot_tables[block_index][slot]
        return self.slot_table[slot]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> logits (N, num_classes): final norm, pool, head."""
        return self.vit.forward_head(self.vit.norm(tokens))

    def forward_detailed(self, images: torch.Tensor, execution_order: Optional[ExecutionOrder] = None,
                         patch_noise: Optional[torch.Tensor] = None) -> ForwardOutput:
        tokens = self.forward_stem(images, patch_noise)
        tokens, position_logits = self.forward_layers(tokens, execution_order)
        logits = self.forward_head(tokens)
        if not position_logits:
            return ForwardOutput(logits)
        # The target of each head is the slot it ran at, whatever block ran there.
        num_slots = len(position_logits)
        slots = torch.arange(num_slots, device=logits.device)
        targets = slots[:, None].expand(num_slots, images.shape[0])
        return ForwardOutput(logits, torch.stack(position_logits), targets)

    def forward(self, images: torch.Tensor, execution_order: Optional[ExecutionOrder] = None,
                patch_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised images (N,3,H,W) -> logits (N, num_classes)."""
        return self.forward_detailed(images, execution_order, patch_noise).logits

    def check_order(self, execution_order: Optional[ExecutionOrder], batch_size: int) -> torch.Tensor:
        """Validate an execution order; return it as a 1-D (shared) or 2-D (per-sample) tensor."""
        if execution_order is None:
            return torch.arange(self.depth)
        order = torch.as_tensor(execution_order, dtype=torch.long).cpu()
        if order.dim() not in (1, 2) or order.shape[-1] == 0:
            raise ValueError(f"an execution order is a non-empty list of block indices (or a (N, k) "
                             f"tensor of them), got shape {tuple(order.shape)}")
        if order.dim() == 2 and order.shape[0] != batch_size:
            raise ValueError(f"per-sample orders: {order.shape[0]} rows for a batch of {batch_size}")
        if order.min() < 0 or order.max() >= self.depth:
            raise ValueError(f"execution order {order.tolist()} has a block index outside "
                             f"[0, {self.depth - 1}]")
        rows = order if order.dim() == 2 else order[None]
        if any(len(set(row.tolist())) != len(row) for row in rows):
            raise ValueError(f"execution order {order.tolist()} repeats a block; each block runs "
                             f"at most once")
        if order.shape[-1] > self.depth:
            raise ValueError(f"execution order has {order.shape[-1]} slots, the model has "
                             f"{self.depth} blocks")
        return order

    def variant_parts(self) -> tuple[str, ...]:
        """The state-dict prefixes of what this variant adds to timm's ViT."""
        return VARIANT_PARTS[self.variant]

    def block_state_prefixes(self, block_index: int) -> tuple[str, ...]:
        """The state-dict prefixes of everything that belongs to one block and moves with it
        when blocks are merged: the timm block, and its LS-pos adapter or LS-pred head. The rest
        (stem, final norm, head) belongs to the model; the slot table an LS-pos block was trained
        with is a row of one tensor, which `anyorder.model.merge` moves with the block."""
        prefixes = [f"vit.blocks.{block_index}."]
        if self.variant == "ls_pos":
            prefixes.append(f"slot_adapters.{block_index}.")
        if self.variant == "ls_pred":
            prefixes.append(f"position_heads.{block_index}.")
        return tuple(prefixes)

    def prune_layers(self, keep: Sequence[int]) -> list[int]:
        """The sequential order restricted to the blocks in `keep` (for test-time pruning)."""
        kept = sorted(set(int(k) for k in keep))
        self.check_order(kept, 1)
        return kept


# -- building models from settings -------------------------------------------------------------

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
    resolved to timm's value and checked (the checks config.py can only do for set values).
    Normalisation is timm's for the architecture. Raises ModelSettingsError naming the key."""
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


def build_model(spec: ModelSpec, pretrained: str = "none", seed: Optional[int] = None
                ) -> AnyOrderViT:
    """Create the timm ViT named by `spec.arch` with its overrides and wrap it.

    `pretrained`: "none", "timm" (timm's weights: needs the model hub or its local cache), or a
    path to a local .safetensors file of timm weights for that architecture. `seed` makes the
    random initialisation reproducible without touching the caller's global random state.
    Problems with the architecture or the weights raise ModelSettingsError (a ConfigError) that
    names the setting, before any weights are trained.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(spec, pretrained)
    import timm

    architecture_defaults(spec.arch)  # a clear error for an unknown or non-ViT name
    kwargs = spec.timm_kwargs()
    if pretrained == "timm":
        _check_timm_weights_fit(spec)
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
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    try:
        vit = timm.create_model(spec.arch, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        if pretrained in ("none", "", None):
            raise ModelSettingsError(f"model: timm cannot build {spec.arch} with "
                                     f"{_overrides(spec)}: {exc}") from exc
        raise ModelSettingsError(
            f"model.pretrained: the weights {pretrained!r} do not load into {spec.arch} with "
            f"{_overrides(spec)}: {str(exc).splitlines()[0][:300]}; set the overrides to null "
            f"to use the shapes the weights were trained with") from exc
    _uniform_drop_path(vit, spec.drop_path_rate)
    return AnyOrderViT(vit, spec)


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
