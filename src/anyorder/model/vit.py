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

The model spec and the timm ViT it names are built in `anyorder.model.spec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from anyorder.model.settings import VARIANTS
from anyorder.model.spec import ModelSpec, build_timm_vit

# Which variants are trained with shuffled orders. A registry, not an if-chain.
SHUFFLED_TRAINING = {"sequential": False, "ls": True, "ls_pos": True, "ls_pred": True}
# The state-dict prefixes of what a variant adds to timm's ViT (new at the start of a fine-tune).
VARIANT_PARTS = {"sequential": (), "ls": (),
                 "ls_pos": ("slot_table", "block_slot_tables", "slot_adapters."),
                 "ls_pred": ("position_heads.",)}
SLOT_TABLES = ("shared", "per_block")  # LS-pos: one table for all blocks, or one per block


ExecutionOrder = Union[Sequence[int], torch.Tensor]


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
