"""Test-time layer pruning: accuracy as blocks are removed.

A pruned model is a shorter execution order, so a pruning curve is an order evaluation: for
k = 0 .. depth-1 blocks removed, `subsets` seeded choices of the blocks kept (all of them when
fewer exist), the kept blocks run in sequential order for a model trained in sequential order,
and in a random order for a LayerShuffle model (each drawn with the subset). The stem runs once
per image and orders sharing their first blocks share that work (`accuracy_for_orders`).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from anyorder.evaluation.accuracy import accuracy_for_orders, summarize
from anyorder.model.vit import AnyOrderViT
from anyorder.evaluation.orders import STREAM_PRUNING, generator_for


def pruning_plan(depth: int, subsets: int, seed: int, shuffled: bool) -> dict[int, list[list[int]]]:
    """For each k in 0..depth-1: the orders evaluated with k blocks removed.

    Sequential models: `subsets` distinct kept-block sets in sequential order (every set when
    there are fewer). LayerShuffle models: `subsets` distinct (set, order) pairs, the order of
    the kept blocks drawn at random; when there are fewer sets than `subsets`, every set is used
    (in turn) with several orders, so each single removal gets the same number of evaluations.
    """
    if depth < 1 or subsets < 1:
        raise ValueError(f"pruning needs depth >= 1 and subsets >= 1, got {depth}, {subsets}")
    plan: dict[int, list[list[int]]] = {}
    for removed in range(depth):
        kept = depth - removed
        generator = generator_for(seed, removed, STREAM_PRUNING)
        total_sets = math.comb(depth, kept)
        if total_sets <= subsets:
            sets = [list(c) for c in itertools.combinations(range(depth), kept)]
        else:
            chosen: set[tuple[int, ...]] = set()
            sets = []
            while len(sets) < subsets:
                pick = tuple(sorted(torch.randperm(depth, generator=generator)[:kept].tolist()))
                if pick not in chosen:
                    chosen.add(pick)
                    sets.append(list(pick))
        if not shuffled:
            plan[removed] = sets
            continue
        count = min(subsets, total_sets * math.factorial(kept))
        orders: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        position = 0
        while len(orders) < count:
            blocks = sets[position % len(sets)]
            position += 1
            order = [blocks[i] for i in torch.randperm(kept, generator=generator).tolist()]
            if tuple(order) in seen:
                continue
            seen.add(tuple(order))
            orders.append(order)
        plan[removed] = orders
    return plan


def pruning_curve(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray, subsets: int,
                  seed: int, batch_size: int = 256, device: torch.device | str = "cpu",
                  shuffled: Optional[bool] = None) -> dict:
    """Test accuracy with k = 0 .. depth-1 blocks removed (see `pruning_plan`).

    Returns {"curve": [{removed, kept, mean, std, min, max, count}], "evaluations": [{removed,
    order, accuracy}], "single_block": {per_block: {block: mean accuracy without it},
    most_harmful, least_harmful}, ...}. `shuffled` defaults to how the variant was trained.
    """
    shuffled = model.behaviour.shuffled_training if shuffled is None else shuffled
    plan = pruning_plan(model.depth, subsets, seed, shuffled)
    flat = [(removed, order) for removed, orders in plan.items() for order in orders]
    accuracies = accuracy_for_orders(model, images, labels, [o for _, o in flat], batch_size,
                                     device)
    evaluations = [{"removed": removed, "order": order, "accuracy": acc}
                   for (removed, order), acc in zip(flat, accuracies)]
    curve = []
    for removed in plan:
        values = [e["accuracy"] for e in evaluations if e["removed"] == removed]
        curve.append({"removed": removed, "kept": model.depth - removed, **summarize(values)})
    result = {"variant": model.variant, "depth": model.depth, "shuffled": shuffled,
              "kept_order": "random" if shuffled else "sequential", "subsets": subsets,
              "seed": seed, "num_images": int(len(labels)), "curve": curve,
              "evaluations": evaluations}
    if model.depth > 1:
        per_block = {}
        for block in range(model.depth):
            values = [e["accuracy"] for e in evaluations
                      if e["removed"] == 1 and block not in e["order"]]
            per_block[str(block)] = float(np.mean(values))
        worst = min(per_block, key=lambda b: (per_block[b], int(b)))
        best = max(per_block, key=lambda b: (per_block[b], -int(b)))
        result["single_block"] = {
            "per_block": per_block,
            "most_harmful": {"block": int(worst), "accuracy": per_block[worst]},
            "least_harmful": {"block": int(best), "accuracy": per_block[best]}}
    return result

