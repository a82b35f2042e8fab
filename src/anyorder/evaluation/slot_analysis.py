"""The analysis stage's work over several models (anyorder.evaluation.analysis per model): the
accuracy lost per skipped slot, a 2-D projection of one block's output run at every slot and,
for LS-pred models, the slot confusion; and the checks of its settings against the models."""
from __future__ import annotations

import importlib.util

import numpy as np

from anyorder.errors import InputError
from anyorder.evaluation.analysis import (block_outputs_by_slot, project, slot_confusion,
                                          slot_contribution, slot_separation)


def check_analysis(models: dict, cfg) -> None:
    """InputError naming the setting if analysis.block is outside a model, or the projection
    asked for is not installed."""
    for name, model in models.items():
        if cfg.block >= model.depth:
            raise InputError(f"analysis.block: {cfg.block} is outside model {name} "
                             f"({model.depth} blocks)")
    if cfg.projection == "umap" and importlib.util.find_spec("umap") is None:
        raise InputError("analysis.projection: umap needs umap-learn (pip install umap-learn), "
                         "or set it to pca")


def analyse(models: dict, images: np.ndarray, labels: np.ndarray, cfg, device):
    """Per model: slot contribution, the projection of block cfg.block's output at every slot
    (on cfg.num_images test images drawn with cfg.seed) and, for LS-pred models, the slot
    confusion; returns (results, projections, CSV rows, confusions)."""
    subset = np.random.default_rng(cfg.seed).permutation(len(labels))[:cfg.num_images]
    results, projections, rows, confusions = {}, {}, [], {}
    for name, model in models.items():
        contribution = slot_contribution(model, images, labels, cfg.num_orders, cfg.seed,
                                         cfg.batch_size, device)
        features, slots = block_outputs_by_slot(model, images[np.sort(subset)], cfg.block,
                                                cfg.seed, cfg.batch_size, device)
        points = project(features, cfg.projection, cfg.seed)
        separation = slot_separation(points, slots)
        projections[name] = (points, slots, separation)
        results[name] = {"variant": model.variant, "slot_contribution": contribution,
                         "projection": {"block": cfg.block, "method": cfg.projection,
                                        "num_images": int(len(subset)),
                                        "slot_separation": separation}}
        if model.behaviour.predicts_slot:
            confusions[name] = slot_confusion(model, images, cfg.num_orders, cfg.seed,
                                              cfg.batch_size, device)
            results[name]["slot_confusion"] = confusions[name]
        rows += [{"model": name, "slot": s, "accuracy_drop": d}
                 for s, d in enumerate(contribution["drop_per_slot"])]
    return results, projections, rows, confusions
