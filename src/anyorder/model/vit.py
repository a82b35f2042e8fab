"""A LayerShuffle wrapper around timm's VisionTransformer.

The wrapped timm model is used as is (never forked). What changes is how its blocks are called:
`forward_layers(tokens, execution_order)` runs the blocks listed in `execution_order`, in that
order; a shorter list is a pruned model. Training, evaluation, pruning, merging and export all go
through that one path.

What each variant (sequential, ls, ls_pos, ls_pred) adds or changes is in
`anyorder.model.variants`, one class per variant, which the model asks through `behaviour`.

The model spec and the timm ViT it names are built in `anyorder.model.spec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from anyorder.model.settings import VARIANTS
from anyorder.model.spec import ModelSpec, build_timm_vit
from anyorder.model.variants import (BEHAVIOURS, SHUFFLED_TRAINING, SLOT_TABLES, VARIANT_PARTS,
                                     PositionHead, SlotAdapter, Variant)

__all__ = ["VARIANTS", "SHUFFLED_TRAINING", "SLOT_TABLES", "VARIANT_PARTS", "AnyOrderViT",
           "ExecutionOrder", "ForwardOutput", "PositionHead", "SlotAdapter", "build_model"]

ExecutionOrder = Union[Sequence[int], torch.Tensor]


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
        self.behaviour.build(self, dim)

    # -- timm's vocabulary, split where our extensions need a seam --------------------------------
    @property
    def variant(self) -> str:
        return self.spec.variant

    @property
    def behaviour(self) -> Variant:
        """What this model's variant adds and changes (`anyorder.model.variants`)."""
        return BEHAVIOURS[self.spec.variant]

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
        behaviour = self.behaviour
        position_logits: list[torch.Tensor] = []
        if order.dim() == 1:
            for slot, block_index in enumerate(order.tolist()):
                tokens = self.run_block(tokens, block_index, slot)
                block_logits = behaviour.position_logits(self, tokens, block_index)
                if block_logits is not None:
                    position_logits.append(block_logits)
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
                head_out = behaviour.position_logits(self, out, block_index)
                if head_out is not None:
                    if slot_logits is None:
                        slot_logits = head_out.new_empty((batch, head_out.shape[1]))
                    slot_logits[rows] = head_out
            tokens = new_tokens
            if slot_logits is not None:
                position_logits.append(slot_logits)
        return tokens, position_logits

    def run_block(self, tokens: torch.Tensor, block_index: int, slot: int) -> torch.Tensor:
        """One block at one execution slot (the slot matters to LS-pos only)."""
        tokens = self.behaviour.before_block(self, tokens, block_index, slot)
        return self.vit.blocks[block_index](tokens)

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
        return self.behaviour.parts

    def block_state_prefixes(self, block_index: int) -> tuple[str, ...]:
        """The state-dict prefixes of everything that belongs to one block and moves with it
        when blocks are merged: the timm block, and its LS-pos adapter or LS-pred head. The rest
        (stem, final norm, head) belongs to the model; the slot table an LS-pos block was trained
        with is a row of one tensor, which `anyorder.model.merge` moves with the block."""
        return (f"vit.blocks.{block_index}.", *self.behaviour.block_prefixes(block_index))

    def prune_layers(self, keep: Sequence[int]) -> list[int]:
        """The sequential order restricted to the blocks in `keep` (for test-time pruning)."""
        kept = sorted(set(int(k) for k in keep))
        self.check_order(kept, 1)
        return kept


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
    return AnyOrderViT(build_timm_vit(spec, pretrained), spec)
