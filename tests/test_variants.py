"""Each variant's behaviour is one class: the registry, the parts it builds, what it tells the
rest of the project (training, merging, export, analysis)."""
import pytest
import torch

from anyorder.model.variants import (BEHAVIOURS, LayerShufflePos, LayerShufflePred, Variant)
from anyorder.model.vit import SHUFFLED_TRAINING, VARIANT_PARTS, VARIANTS

from conftest import tiny_model

# The state-dict keys each variant adds to timm's ViT (depth 2), in the order they are created:
# checkpoints on disk hold these names, and the creation order fixes the initialisation.
ADDED_KEYS = {
    "sequential": [], "ls": [],
    "ls_pos": ["slot_table", *(f"slot_adapters.{i}.{part}" for i in range(2)
                               for part in ("norm.weight", "norm.bias", "proj.weight",
                                            "proj.bias"))],
    "ls_pred": [f"position_heads.{i}.{part}" for i in range(2)
                for part in ("norm.weight", "norm.bias", "fc.weight", "fc.bias")],
}


def test_every_variant_has_one_behaviour_named_after_it():
    assert list(BEHAVIOURS) == list(VARIANTS)
    assert all(behaviour.name == name for name, behaviour in BEHAVIOURS.items())
    assert SHUFFLED_TRAINING == {"sequential": False, "ls": True, "ls_pos": True,
                                 "ls_pred": True}
    assert VARIANT_PARTS == {name: b.parts for name, b in BEHAVIOURS.items()}
    assert type(BEHAVIOURS["sequential"]) is Variant
    assert [n for n, b in BEHAVIOURS.items() if b.slot_input] == ["ls_pos"]
    assert [n for n, b in BEHAVIOURS.items() if b.predicts_slot] == ["ls_pred"]
    assert [n for n, b in BEHAVIOURS.items() if b.recorded_sums] == ["ls_pred"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_model_holds_the_parts_its_behaviour_names(variant):
    model = tiny_model(variant, depth=2)
    assert model.behaviour is BEHAVIOURS[variant]
    added = [k for k in model.state_dict() if not k.startswith("vit.")]
    assert added == ADDED_KEYS[variant]
    assert all(k.startswith(model.variant_parts()) for k in added)
    for block in range(2):
        own = [k for k in added if k.startswith(model.block_state_prefixes(block))]
        assert own == [k for k in added if f".{block}." in k]


def test_per_block_slot_tables_replace_the_shared_one():
    model = tiny_model("ls_pos", depth=3, slot_tables="per_block")
    added = [k for k in model.state_dict() if not k.startswith("vit.")]
    assert added[0] == "block_slot_tables" and "slot_table" not in added
    assert added[0].startswith(model.variant_parts())
    behaviour = model.behaviour
    assert isinstance(behaviour, LayerShufflePos)
    assert torch.equal(behaviour.slot_table(model, 2), model.block_slot_tables[2])


def test_the_neutral_behaviour_leaves_tokens_and_adds_no_logits():
    model = tiny_model("ls", depth=2)
    tokens = torch.randn(2, 5, 32)
    assert model.behaviour.before_block(model, tokens, 1, 0) is tokens
    assert model.behaviour.position_logits(model, tokens, 1) is None
    pred = tiny_model("ls_pred", depth=2)
    assert isinstance(pred.behaviour, LayerShufflePred)
    assert pred.behaviour.position_logits(pred, tokens, 1).shape == (2, 2)
