"""Pruning (plans, curves, evaluation that shares block work), LayerDrop, shallow models, the
analysis and the report's tables, on tiny models."""
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import shipped_params, tiny_model, tiny_spec
from model_fixtures import perturbed
from anyorder.evaluation.analysis import (block_outputs_by_slot, project, slot_confusion, slot_contribution,
                               slot_separation)
from anyorder.model.checkpoint import load_start_weights, save_model
from anyorder.config import settings_from_dict
from anyorder.model.settings import FinetuneRun
from anyorder.settings import ConfigError
from anyorder.training.settings import TrainConfig
from anyorder.evaluation.accuracy import accuracy_for_orders
from anyorder.model.spec import variant_spec
from anyorder.model.vit import build_model
from anyorder.evaluation.orders import OrderSampler, epoch_orders, layerdrop_rates
from anyorder.evaluation.pruning import pruning_curve, pruning_plan
from anyorder.report import kept_at, merge_summary, pruning_rows, report_markdown
from anyorder.training.loop import train_model


# -- evaluation that shares work -----------------------------------------------------------------

def test_orders_sharing_a_prefix_share_its_blocks_and_give_the_same_accuracies(digits16,
                                                                               monkeypatch):
    model = perturbed("ls_pos", seed=1, scale=0.3)  # slot-dependent: a wrong slot would show
    images, labels = digits16["test"]
    orders = [[0, 1, 2, 3], [0, 1, 3], [3, 2, 1, 0], [0, 1, 3, 2], None, [2]]
    expected = []
    with torch.no_grad():
        for order in orders:
            logits = model(torch.as_tensor(normalised(model, images)), order)
            expected.append(float((logits.argmax(1).numpy() == labels).mean()))
    calls = []
    original = model.run_block
    monkeypatch.setattr(model, "run_block",
                        lambda t, b, s: calls.append((b, s)) or original(t, b, s))
    assert accuracy_for_orders(model, images, labels, orders, batch_size=1000) == expected
    naive = sum(len(o) if o else 4 for o in orders)
    assert len(calls) < naive  # [0,1,...] prefixes computed once
    # sorted walk: 0123 (4 calls), None = 0123 (0), 013 (+1), 0132 (+1), 2 (1), 3210 (4)
    assert len(calls) == 4 + 0 + 1 + 1 + 1 + 4


def normalised(model, images):
    from anyorder.data.inputs import to_model_input
    return to_model_input(images, model.spec, torch.device("cpu")).numpy()


# -- pruning -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffled", [False, True])
def test_the_pruning_plan_removes_exactly_k_blocks(shuffled):
    plan = pruning_plan(6, 12, seed=4, shuffled=shuffled)
    assert sorted(plan) == list(range(6))
    for removed, orders in plan.items():
        total = math.comb(6, 6 - removed)
        assert len(orders) == (min(12, total * math.factorial(6 - removed)) if shuffled
                               else min(12, total))
        assert len({tuple(o) for o in orders}) == len(orders)  # distinct
        for order in orders:
            assert len(order) == len(set(order)) == 6 - removed
            assert shuffled or order == sorted(order)
    assert plan == pruning_plan(6, 12, seed=4, shuffled=shuffled)  # seeded
    if shuffled:  # kept blocks in random orders, not always sorted
        assert any(o != sorted(o) for o in plan[2])


def test_pruning_runs_exactly_the_blocks_it_reports(digits16, monkeypatch):
    model = perturbed("ls", seed=1, scale=0.3)
    images, labels = digits16["test"]
    result = pruning_curve(model, images, labels, subsets=5, seed=0)
    for evaluation in result["evaluations"]:
        order = evaluation["order"]
        assert len(set(range(4)) - set(order)) == evaluation["removed"]
        ran = []
        original = model.run_block
        monkeypatch.setattr(model, "run_block",
                            lambda t, b, s: ran.append((b, s)) or original(t, b, s))
        accuracy = accuracy_for_orders(model, images, labels, [order], batch_size=1000)[0]
        monkeypatch.undo()
        assert ran == [(b, s) for s, b in enumerate(order)]
        assert accuracy == evaluation["accuracy"]
    assert [row["kept"] for row in result["curve"]] == [4, 3, 2, 1]
    single = result["single_block"]
    assert single["most_harmful"]["accuracy"] == min(single["per_block"].values())
    assert single["least_harmful"]["accuracy"] == max(single["per_block"].values())
    rows = pruning_rows({"m": result}, {"m": "layershuffle"})
    assert 0 < kept_at(rows, "m", 3) <= 1.5  # one block removed, against unpruned


# -- LayerDrop and shallow models ----------------------------------------------------------------

def test_layerdrop_rates_follow_the_slot():
    assert layerdrop_rates(4, 0.2) == [0.2] * 4
    assert layerdrop_rates(4, 0.4, "linear") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="unknown LayerDrop schedule"):
        layerdrop_rates(4, 0.2, "cosine")


def test_layerdrop_skips_blocks_by_slot_and_keeps_the_order():
    generator = torch.Generator().manual_seed(0)
    sampler = OrderSampler(8, shuffle=False, drop_rates=[0.0] * 4 + [0.9] * 4)
    orders = [sampler.sample(16, generator).tolist() for _ in range(300)]
    assert all(o == sorted(o) and o[:4] == [0, 1, 2, 3] for o in orders)  # slots 0-3 never drop
    late = np.mean([len(o) - 4 for o in orders]) / 4
    assert 0.05 < late < 0.2  # slots 4-7 kept about 10% of the time
    # shuffled: the rate belongs to the slot, whatever block runs there
    sampler = OrderSampler(4, shuffle=True, drop_rates=[0.0, 0.0, 0.0, 1.0])
    assert all(len(sampler.sample(1, generator)) == 3 for _ in range(50))
    # never an empty model
    assert all(len(OrderSampler(3, False, drop_rates=[1.0] * 3).sample(1, generator)) == 1
               for _ in range(20))
    # no rate: the orders are those drawn without LayerDrop
    assert [o.tolist() for o in epoch_orders(1, 0, 100, 32, 4, True, False, [0.0] * 4)] == \
        [o.tolist() for o in epoch_orders(1, 0, 100, 32, 4, True, False)]


def test_layerdrop_training_runs_shortened_orders_and_records_them(digits16):
    model = tiny_model("sequential")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3)
    result = train_model(model, digits16["train"], digits16["val"], cfg, seed=0, progress=False,
                         layerdrop=layerdrop_rates(4, 0.5))
    assert len(result.orders) == math.ceil(len(digits16["train"][1]) / 64)
    assert any(len(o) < 4 for o in result.orders)
    assert all(o == sorted(o) for o in result.orders)


@pytest.mark.parametrize("entry, message", [
    ({"variant": "ls", "layerdrop_rate": 1.0}, "layerdrop_rate: must be in \\[0, 1\\)"),
    ({"variant": "ls", "layerdrop_rate": 0.2, "order_sampling": "sample"},
     "layerdrop_rate: needs order_sampling: batch"),
    ({"variant": "ls", "layerdrop_schedule": "linear"},
     "layerdrop_schedule: has no effect without layerdrop_rate"),
    ({"variant": "sequential", "depth": 0}, "depth: must be >= 1"),
])
def test_bad_baseline_knobs_are_refused_naming_the_key(entry, message):
    with pytest.raises(ConfigError, match=f"finetune.runs.x.{message}"):
        settings_from_dict(shipped_params({"finetune": {"runs": {"x": {"seed": 0, **entry}}}}))


def test_a_shallow_run_keeps_the_first_blocks_of_its_start(tmp_path):
    base = tiny_spec("sequential", depth=4)
    spec = variant_spec(base, FinetuneRun(variant="sequential", depth=2))
    assert spec.depth == 2 and variant_spec(base, FinetuneRun()).depth == 4
    start = tiny_model("sequential", depth=4, seed=1)
    save_model(start, tmp_path / "start")
    shallow = build_model(spec, seed=2)
    load_start_weights(shallow, tmp_path / "start")
    theirs, ours = start.state_dict(), shallow.state_dict()
    for key, value in ours.items():  # blocks 0 and 1, stem, norm and head: the start's own
        assert torch.equal(value, theirs[key]), key
    assert not any(k.startswith(("vit.blocks.2.", "vit.blocks.3.")) for k in ours)


# -- analysis ------------------------------------------------------------------------------------

def test_slot_confusion_counts_every_head_at_every_slot(digits16):
    model = perturbed("ls_pred", seed=1)
    images = digits16["test"][0][:20]
    confusion = slot_confusion(model, images, num_orders=3, seed=0)
    matrix = np.asarray(confusion["matrix"])
    assert matrix.shape == (4, 4) and (matrix.sum(axis=1) == 3 * 20).all()
    assert confusion["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    with pytest.raises(ValueError, match="ls_pred"):
        slot_confusion(tiny_model("ls"), images, 1, 0)


def test_slot_contribution_is_the_drop_when_a_slot_is_skipped(digits16):
    model = perturbed("sequential", seed=1, scale=0.2)
    images, labels = digits16["test"]
    result = slot_contribution(model, images, labels, num_orders=5, seed=0)
    full = accuracy_for_orders(model, images, labels, [None])[0]
    for slot, drop in enumerate(result["drop_per_slot"]):
        order = [b for b in range(4) if b != slot]
        assert drop == pytest.approx(full - accuracy_for_orders(model, images, labels,
                                                                [order])[0])
    assert result["orders"] == "sequential" and result["num_orders"] == 1


def test_block_outputs_are_projected_per_slot_deterministically(digits16):
    model = perturbed("ls", seed=1)
    images = digits16["test"][0][:12]
    features, slots = block_outputs_by_slot(model, images, block=2, seed=0)
    assert features.shape == (4 * 12, 32) and list(np.bincount(slots)) == [12] * 4
    points = project(features)
    assert points.shape == (48, 2) and np.array_equal(points, project(features))
    apart = np.concatenate([np.zeros((5, 2)), np.ones((5, 2))])
    assert slot_separation(apart, np.array([0] * 5 + [1] * 5)) == pytest.approx(1.0)


# -- the report's tables ---------------------------------------------------------------------------

def test_the_report_page_holds_every_section_and_the_merge_comparison():
    curve = lambda acc: {"variant": "ls", "curve": [{"removed": k, "kept": 4 - k, "mean": a, "std": 0.0,
                                    "min": a, "max": a, "count": 1}
                                   for k, a in enumerate(acc)]}
    rows = pruning_rows({"seq": curve([0.9, 0.5, 0.3, 0.1]), "ls": curve([0.8, 0.76, 0.6, 0.3])},
                        {"seq": "sequential", "ls": "layershuffle"})
    assert {(r["model"], r["blocks_run"]) for r in rows} == set(
        itertools.product(["seq", "ls"], [1, 2, 3, 4]))
    runs = {name: {"arbitrary": {"mean": m, "min": m, "count": 50}} for name, m in
            (("a", 0.9), ("b", 0.8), ("m", 0.86))}
    card = {"generator": "random", "seed": 0, "sources": {"a": {}, "b": {}},
            "recipe": {"slots": [{"source": "a", "block": 0}]},
            "validation": {"merged": 0.9, "best_source": 0.91, "sources_mean": 0.88},
            "test": {"arbitrary": runs["m"]["arbitrary"]}}
    merges = merge_summary({"m": card}, runs)
    assert merges["m"]["test_sources_mean"] == pytest.approx(0.85)
    assert merges["m"]["test_merged_minus_sources_points"] == pytest.approx(1.0)
    summary = {"baseline_run": "seq", "baseline_fine_tune_epochs": 24,
               "runs": {"seq": {"variant": "sequential", "sequential": 0.9, "arbitrary_mean": 0.4,
                                "arbitrary_min": 0.1, "depth": 4, "fine_tune_epochs": 24,
                                "equal_budget": True}}}
    page = report_markdown(summary, rows, merges, None, "| robustness |\n",
                           {"pruning": "../plots/pruning/pruning.png"})
    for part in ("## Models", "## Pruning", "![pruning](../plots/pruning/pruning.png)",
                 "## Frankenstein merges", "a:0", "## Robustness", "| robustness |"):
        assert part in page
    assert "| seq | sequential | 4 | 24 | 0.9000 | 0.4000 | 0.1000 |  | 0.5556 |" in page
