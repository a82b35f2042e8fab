"""Merging on tiny models: recipes, the generators (random, greedy, manual), the merged
checkpoint (blocks, adapters and slot tables from their sources), incompatible sources refused
by name (bad merge settings: tests/test_config.py)."""
import pytest
import torch

from conftest import tiny_model
from model_fixtures import perturbed
from anyorder.model.checkpoint import load_model, save_model, tensors_digest
from anyorder.evaluation.accuracy import evaluate_orders
from anyorder.export.blocks import check_export, export_model
from anyorder.model.merge import (GENERATORS, MergeContext, MergeError, Recipe, Scorer,
                            check_compatible, merge_models)


def save_sources(tmp_path, models: dict) -> dict[str, str]:
    out = {}
    for name, model in models.items():
        save_model(model, tmp_path / name)
        out[name] = str(tmp_path / name)
    return out


# -- recipes -------------------------------------------------------------------------------------

def test_a_recipe_round_trips_through_yaml(tmp_path):
    recipe = Recipe("a", {"a": "models/finetune/a", "b": "models/finetune/b"},
                    [("a", 0), ("b", 1), ("b", 2), ("a", 3)], "random", 7)
    recipe.save(tmp_path / "r.yaml")
    again = Recipe.load(tmp_path / "r.yaml")
    assert again == recipe and again.to_yaml() == recipe.to_yaml()


@pytest.mark.parametrize("raw, message", [
    ({"base": "c", "sources": {"a": "x"}, "slots": [{"source": "a", "block": 0}]},
     "recipe.base: 'c' is not one of the sources"),
    ({"base": "a", "sources": {"a": "x"}, "slots": [{"source": "b", "block": 0}]},
     "recipe.slots[0].source: 'b'"),
    ({"base": "a", "sources": {"a": "x"}, "slots": [{"source": "a", "block": -1}]},
     "recipe.slots[0].block: must be a block index >= 0"),
    ({"base": "a", "sources": {"a": "x"}, "slots": []}, "recipe.slots: must list"),
    ({"base": "a", "sources": {"a": "x"}, "slots": [{"source": "a", "block": 0}], "extra": 1},
     "unknown key 'extra'"),
    ({"base": "a", "sources": {"a": "x"}, "slots": [{"source": "a", "block": 0}],
      "generator": "soup"}, "recipe.generator: unknown 'soup'"),
])
def test_a_malformed_recipe_is_refused_naming_the_field(raw, message):
    with pytest.raises(MergeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Recipe.from_dict(raw)


# -- merging -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["ls", "ls_pos", "ls_pred"])
def test_a_merge_of_identical_sources_is_the_source_bit_for_bit(variant, tmp_path):
    source = perturbed(variant)
    models = {"a": source, "b": load_model(save_sources(tmp_path, {"b": source})["b"])}
    result = GENERATORS["random"](MergeContext({"a": "a", "b": "b"}, models, seed=3))
    assert {s for s, _ in result.recipe.slots} == {"a", "b"}  # both sources were drawn
    merged = merge_models(result.recipe, models)
    assert tensors_digest(merged.state_dict()) == tensors_digest(source.state_dict())
    save_model(merged, tmp_path / "merged")
    save_model(source, tmp_path / "again")
    assert (tmp_path / "merged/model.safetensors").read_bytes() == \
        (tmp_path / "again/model.safetensors").read_bytes()


def test_a_merged_block_carries_its_own_adapter_and_the_base_keeps_the_rest():
    a, b = perturbed("ls_pos", seed=1), perturbed("ls_pos", seed=2)
    recipe = Recipe("a", {"a": "", "b": ""}, [("a", 0), ("b", 1), ("a", 2), ("b", 3)])
    merged = merge_models(recipe, {"a": a, "b": b}).state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in merged.items():
        if key == "block_slot_tables":
            continue
        from_b = any(key.startswith(p) for slot in (1, 3) for p in a.block_state_prefixes(slot))
        assert torch.equal(value, (sb if from_b else sa)[key]), key


def test_an_ls_pos_block_reads_the_slot_table_it_was_trained_with_in_a_merge(tmp_path):
    """Two LS-pos runs learn different slot tables; a merged block must see, at every slot, the
    embedding its own run gave that slot (its adapter never saw the other table)."""
    a, b = perturbed("ls_pos", seed=1, scale=0.3), perturbed("ls_pos", seed=2, scale=0.3)
    assert not torch.equal(a.slot_table, b.slot_table)
    recipe = Recipe("a", {"a": "", "b": ""}, [("b", 3), ("a", 1), ("b", 0), ("a", 2)])
    merged = merge_models(recipe, {"a": a, "b": b}).eval()
    assert merged.spec.slot_tables == "per_block"
    tokens = merged.forward_stem(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        for index, (source, block) in enumerate(recipe.slots):
            own = {"a": a, "b": b}[source].eval()
            for slot in range(4):  # the block at any execution slot: as in its own model
                assert torch.equal(merged.run_block(tokens, index, slot),
                                   own.run_block(tokens, block, slot)), (index, slot)
    # A checkpoint like any other: saved, loaded, exported with the tables it carries.
    save_model(merged, tmp_path / "merged")
    again = load_model(tmp_path / "merged")
    assert again.spec.slot_tables == "per_block"
    assert torch.equal(again.block_slot_tables, merged.block_slot_tables)
    export_model(merged, tmp_path / "export", "merged", 17)
    assert check_export(merged, tmp_path / "export", 3, 0)["max_abs_error"] < 1e-4
    from anyorder.model.merge import slot_table_sources
    assert slot_table_sources(recipe, merged) == {
        "layout": "per_block", "per_slot": ["b:3", "a:1", "b:0", "a:2"]}


def test_blocks_move_to_the_slot_the_recipe_gives_them():
    a, b = perturbed("ls", seed=1), perturbed("ls", seed=2)
    recipe = Recipe("a", {"a": "", "b": ""}, [("b", 3), ("a", 0), ("a", 1), ("b", 0)])
    merged = merge_models(recipe, {"a": a, "b": b})
    for slot, (source, block) in enumerate(recipe.slots):
        theirs = {"a": a, "b": b}[source].vit.blocks[block].state_dict()
        for key, value in merged.vit.blocks[slot].state_dict().items():
            assert torch.equal(value, theirs[key])


@pytest.mark.parametrize("change, field", [
    (dict(variant="sequential"), "variant"), (dict(embed_dim=48), "embed_dim"),
    (dict(depth=3), "depth"), (dict(patch_size=8), "patch_size"),
    (dict(num_classes=5, class_names=list("abcde")), "num_classes"),
])
def test_incompatible_sources_are_refused_naming_the_mismatch(change, field):
    variant = change.pop("variant", "ls")
    depth = change.pop("depth", 4)
    a, b = tiny_model("ls"), tiny_model(variant, depth=depth, **change)
    with pytest.raises(MergeError, match=f"sources a and b differ in {field}"):
        check_compatible({"a": a.spec, "b": b.spec})
    recipe = Recipe("a", {"a": "", "b": ""}, [("a", i) for i in range(4)])
    with pytest.raises(MergeError, match=field):
        merge_models(recipe, {"a": a, "b": b})


def test_a_recipe_naming_a_block_the_source_lacks_is_refused():
    a, b = perturbed("ls", 1), perturbed("ls", 2)
    with pytest.raises(MergeError, match="b has no block 9"):
        merge_models(Recipe("a", {"a": "", "b": ""}, [("a", 0), ("b", 9), ("a", 2), ("a", 3)]),
                     {"a": a, "b": b})
    with pytest.raises(MergeError, match="recipe has 2 slots, its sources have 4 blocks"):
        merge_models(Recipe("a", {"a": "", "b": ""}, [("a", 0), ("b", 1)]), {"a": a, "b": b})


def test_the_greedy_rule_never_accepts_a_slot_that_lowers_validation_accuracy(digits16):
    models = {f"s{i}": perturbed("ls", seed=i, scale=0.3) for i in range(3)}
    images, labels = digits16["val"]
    scorer = Scorer(images, labels, num_orders=3, seed=0, batch_size=128)
    result = GENERATORS["greedy"](MergeContext({n: n for n in models}, models, seed=0,
                                               scorer=scorer))
    steps = result.history[1:]
    assert len(steps) == 4 * 2  # every slot, every other source
    for step in steps:
        assert step["accepted"] == (step["score"] >= step["previous"])
    accepted = [result.history[0]["score"]] + [s["score"] for s in steps if s["accepted"]]
    assert accepted == sorted(accepted)
    assert any(not s["accepted"] for s in steps)  # the rule was put to the test
    merged_score = scorer(merge_models(result.recipe, models))
    assert merged_score == accepted[-1] >= max(result.source_scores.values())


def test_the_random_generator_is_seeded():
    models = {n: perturbed("ls", seed=i) for i, n in enumerate("abc")}
    draw = lambda seed: GENERATORS["random"](MergeContext({n: n for n in models}, models,
                                                          seed=seed)).recipe.slots
    assert draw(5) == draw(5) and [b for _, b in draw(5)] == [0, 1, 2, 3]
    assert any(draw(5) != draw(seed) for seed in range(6, 10))


def test_the_manual_generator_reads_a_recipe_file(tmp_path):
    models = {"a": perturbed("ls", 1), "b": perturbed("ls", 2)}
    recipe = Recipe("b", {"a": "x/a", "b": "x/b"}, [("b", 3), ("a", 2), ("b", 1), ("a", 0)])
    recipe.save(tmp_path / "r.yaml")
    result = GENERATORS["manual"](MergeContext({}, models, recipe_path=str(tmp_path / "r.yaml")))
    assert result.recipe == recipe and merge_models(result.recipe, models).depth == 4
    with pytest.raises(MergeError, match="needs a recipe file"):
        GENERATORS["manual"](MergeContext({}, models))


def test_a_merged_model_saves_evaluates_and_exports_like_any_other(tmp_path, digits16):
    models = {"a": perturbed("ls", 1), "b": perturbed("ls", 2)}
    recipe = Recipe("b", {"a": "", "b": ""}, [("a", 0), ("b", 1), ("a", 2), ("b", 3)])
    save_model(merge_models(recipe, models), tmp_path / "merged", {"training": {"seed": 0}})
    merged = load_model(tmp_path / "merged")
    images, labels = digits16["test"]
    evaluation = evaluate_orders(merged, images, labels, 3, 0)
    assert evaluation["arbitrary"]["count"] == 3
    export_model(merged, tmp_path / "export", "merged", 17, {"sequential": evaluation["sequential"]},
                 checkpoint_dir=tmp_path / "merged")
    assert check_export(merged, tmp_path / "export", 2, 0)["max_abs_error"] < 1e-4
