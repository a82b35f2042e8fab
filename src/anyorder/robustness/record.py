"""One model's robustness as the pipeline records it (metrics/robustness/<name>.json): the
robustness evaluation, the clean accuracy of the model a fine-tune started from, and the noise
every epoch of a nullspace fine-tune trained on (its synthesis); and what a nullspace arm trains
with, as its model records it."""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import numpy as np

from anyorder.robustness.evaluate import accuracy, evaluate_robustness, order_groups
from anyorder.robustness.settings import RobustnessConfig


def arm_recipe(name: str, start: str, noise: str, synthesis) -> dict:
    """A nullspace arm's start model (its directory), noise kind and synthesis settings
    (recorded in its model.json, and part of its resume fingerprint)."""
    return {"arm": name, "start": start, "noise": noise, "synthesis": asdict(synthesis)}


def synthesis_per_epoch(history: list[dict]) -> list[dict]:
    """The noise each epoch trained on (its synthesis), from the training history; a warning
    line for every epoch whose synthesis missed epsilon."""
    records = [{"epoch": r["epoch"], **{k[len("noise_"):]: v for k, v in r.items()
                                        if k.startswith("noise_")}}
               for r in history if "noise_steps" in r]
    for r in records:
        if not r["converged"]:
            print(f"warning: epoch {r['epoch']}: the noise synthesis did not reach epsilon "
                  f"(distance {r['distance']:.4g} after {r['steps']} steps): this epoch trained "
                  f"on noise that is not in the approximate nullspace")
    return records


def robustness_record(cfg: RobustnessConfig, model, name: str, test: tuple,
                      train_images: np.ndarray,
                      corrupted: dict[str, np.ndarray], device, start=None,
                      training_synthesis: Optional[list[dict]] = None,
                      extra: Optional[dict] = None) -> tuple[dict, dict]:
    """Robustness of `model` on `test` (images, labels) as metrics/robustness/<name>.json holds
    it; with `start` (the model a fine-tune began from), also its clean accuracy in the same
    modes; with `training_synthesis` (a nullspace fine-tune's noise, per epoch), that record too.
    Returns the record and the per-image outcomes (for metrics/outcomes/<name>.json)."""
    images, labels = test
    result = evaluate_robustness(model, images, labels, corrupted, train_images, cfg, device)
    outcomes = result.pop("outcomes")
    metrics = {"model": name, **(extra or {}), **result}
    if start is not None:
        modes = order_groups(start, len(labels), cfg.num_orders, cfg.order_seed)
        metrics["start_clean_accuracy"] = {
            mode: accuracy(start, images, labels, groups, cfg.batch_size, device)
            for mode, groups in modes.items()}
    if training_synthesis is not None:
        metrics["training_synthesis"] = {
            "converged_every_epoch": all(r["converged"] for r in training_synthesis),
            "epochs": training_synthesis}
    return metrics, outcomes
