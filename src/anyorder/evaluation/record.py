"""A model's test evaluation as the pipeline records it (metrics/evaluate/<name>.json and
metrics/pruning/<name>.json): accuracy in sequential order and over the evaluate stage's seeded
random orders, and its pruning curve. A merged model is evaluated exactly like a fine-tuned one,
on the same orders."""
from __future__ import annotations

from typing import Optional

from anyorder.evaluation.accuracy import evaluate_orders
from anyorder.evaluation.pruning import pruning_curve


def evaluate_and_prune(cfg, prune, model, name: str, seed, test: tuple, device, pruning_device,
                       extra: Optional[dict] = None) -> tuple[dict, dict, dict]:
    """The model's order evaluation (settings `cfg`: the evaluate section) and pruning curve
    (`prune`: the pruning section) on `test` (images, labels: the test split the stage loaded
    before any compute), as the metrics files hold them (`extra` added to the evaluation), and
    the per-image outcomes of the orders (for metrics/outcomes/<name>.json)."""
    images, labels = test
    result = evaluate_orders(model, images, labels, cfg.num_orders, cfg.order_seed,
                             cfg.batch_size, device)
    outcomes = result.pop("outcomes")
    metrics = {"run": name, "variant": model.variant, "seed": seed, **(extra or {}), **result}
    pruning = {"model": name, **pruning_curve(model, images, labels, prune.subsets, prune.seed,
                                              prune.batch_size, pruning_device)}
    return metrics, pruning, outcomes
