"""What each model variant changes, in one class per variant (spec section 1).

- ``sequential``: the baseline; trained in order 0..L-1.
- ``ls``: blocks run in a random order each batch; nothing else changes.
- ``ls_pos``: each block gets an adapter told the slot it runs at:
  ``h = h + GELU(Linear(LayerNorm(concat(h, E[slot]))))`` with one shared table E (L x 32), or
  one table per block (a Frankenstein model of several LS-pos runs).
- ``ls_pred``: each block owns a head (LayerNorm, Linear(dim -> L)) that predicts, from its
  mean-pooled output, the slot it ran at; trained with cross-entropy next to the class loss.

`Variant` holds the neutral behaviour (timm's blocks as they are); each LayerShuffle variant
overrides only what it changes. `BEHAVIOURS` maps a variant's name to its behaviour, which
`AnyOrderViT.behaviour` returns: the model, the training loop, merging, export and analysis ask
it instead of comparing variant names. The behaviours hold no state: the parts they build live
on the model, and every method is given the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from anyorder.model.vit import AnyOrderViT

SLOT_TABLES = ("shared", "per_block")  # LS-pos: one table for all blocks, or one per block


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


class Variant:
    """The sequential baseline: timm's blocks as they are, trained in order 0..L-1."""
    name = "sequential"
    shuffled_training = False      # trained in random block orders
    parts: tuple[str, ...] = ()    # state-dict prefixes of what it adds to timm's ViT
    slot_input = False             # blocks read their execution slot (exported with a "slot")
    predicts_slot = False          # blocks' outputs give position logits
    recorded_sums: dict[str, str] = {}  # training-record key -> the epoch sum it averages

    def build(self, model: "AnyOrderViT", dim: int) -> None:
        """Add the variant's parts to `model` (whose timm ViT of width `dim` is in place)."""

    def before_block(self, model: "AnyOrderViT", tokens: torch.Tensor, block_index: int,
                     slot) -> torch.Tensor:
        """The tokens block `block_index` receives when it runs at execution slot `slot`."""
        return tokens

    def position_logits(self, model: "AnyOrderViT", tokens: torch.Tensor,
                        block_index: int) -> Optional[torch.Tensor]:
        """The (N, depth) position logits of block `block_index`'s output `tokens`, or None."""
        return None

    def block_prefixes(self, block_index: int) -> tuple[str, ...]:
        """State-dict prefixes of the parts that belong to block `block_index` beyond the timm
        block (they move with it when blocks are merged)."""
        return ()


class LayerShuffle(Variant):
    """Blocks trained in a random order each batch; nothing else changes."""
    name = "ls"
    shuffled_training = True


class LayerShufflePos(LayerShuffle):
    """Each block gets a `SlotAdapter` fed the row of the slot table for the slot it runs at."""
    name = "ls_pos"
    parts = ("slot_table", "block_slot_tables", "slot_adapters.")
    slot_input = True

    def build(self, model: "AnyOrderViT", dim: int) -> None:
        width = model.spec.position_embedding_dim
        if model.spec.slot_tables == "per_block":
            model.block_slot_tables = nn.Parameter(torch.zeros(model.depth, model.depth, width))
        else:
            model.slot_table = nn.Parameter(torch.zeros(model.depth, width))
        model.slot_adapters = nn.ModuleList(SlotAdapter(dim, width) for _ in range(model.depth))

    def slot_table(self, model: "AnyOrderViT", block_index: int) -> torch.Tensor:
        """The slot table (slots x width) block `block_index` reads its slot from: the shared
        table, or the block's own in a model of per-block tables."""
        if model.spec.slot_tables == "per_block":
            return model.block_slot_tables[block_index]
        return model.slot_table

    def before_block(self, model: "AnyOrderViT", tokens: torch.Tensor, block_index: int,
                     slot) -> torch.Tensor:
        return model.slot_adapters[block_index](tokens, self.slot_table(model, block_index)[slot])

    def block_prefixes(self, block_index: int) -> tuple[str, ...]:
        return (f"slot_adapters.{block_index}.",)


class LayerShufflePred(LayerShuffle):
    """Each block owns a `PositionHead` predicting, from its output, the slot it ran at."""
    name = "ls_pred"
    parts = ("position_heads.",)
    predicts_slot = True
    recorded_sums = {"train_position_loss": "position_loss"}

    def build(self, model: "AnyOrderViT", dim: int) -> None:
        model.position_heads = nn.ModuleList(PositionHead(dim, model.depth)
                                             for _ in range(model.depth))

    def position_logits(self, model: "AnyOrderViT", tokens: torch.Tensor,
                        block_index: int) -> Optional[torch.Tensor]:
        return model.position_heads[block_index](tokens)

    def block_prefixes(self, block_index: int) -> tuple[str, ...]:
        return (f"position_heads.{block_index}.",)


BEHAVIOURS: dict[str, Variant] = {behaviour.name: behaviour for behaviour in (
    Variant(), LayerShuffle(), LayerShufflePos(), LayerShufflePred())}

# Per variant name: trained with shuffled orders; the state-dict prefixes it adds.
SHUFFLED_TRAINING = {name: b.shuffled_training for name, b in BEHAVIOURS.items()}
VARIANT_PARTS = {name: b.parts for name, b in BEHAVIOURS.items()}
