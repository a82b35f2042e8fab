"""What evaluate@<run> and merge@<name> share: a model's test evaluation in sequential order and
over the evaluate stage's seeded random orders (metrics/evaluate/<name>.json, plots/orders/
<name>.csv), and its pruning curve (metrics/pruning/<name>.json). A merged model is evaluated
exactly like a fine-tuned one, on the same orders."""
from __future__ import annotations

from _stage import METRICS, PLOTS

from anyorder.evaluation.accuracy import evaluate_orders
from anyorder.files import atomic_write_csv, atomic_write_json
from anyorder.evaluation.pruning import pruning_curve


def evaluate_and_prune(settings, model, name: str, seed, test, device, pruning_device, mlflow,
                       extra: dict | None = None) -> tuple[dict, dict, dict]:
    """Write the model's order evaluation and pruning curve on `test` (images, labels: the
    test split the stage loaded before any compute); log both to MLflow. Returns them and the
    per-image outcomes of the orders (for metrics/outcomes/<name>.json)."""
    cfg, prune = settings.evaluate, settings.pruning
    images, labels = test
    result = evaluate_orders(model, images, labels, cfg.num_orders, cfg.order_seed,
                             cfg.batch_size, device)
    outcomes = result.pop("outcomes")
    metrics = {"run": name, "variant": model.variant, "seed": seed, **(extra or {}), **result}
    atomic_write_json(METRICS / "evaluate" / f"{name}.json", metrics)
    atomic_write_csv(PLOTS / "orders" / f"{name}.csv", [
        {"order_index": i, "accuracy": acc, "order": "-".join(map(str, order))}
        for i, (order, acc) in enumerate(zip(result["orders"], result["order_accuracies"]))])
    arbitrary = result["arbitrary"]
    mlflow.log_metrics({"test_accuracy_sequential": result["sequential"],
                        **{f"test_accuracy_arbitrary_{k}": v for k, v in arbitrary.items()
                           if k != "count"}})
    mlflow.log_artifact(str(METRICS / "evaluate" / f"{name}.json"))
    pruning = {"model": name, **pruning_curve(model, images, labels, prune.subsets, prune.seed,
                                              prune.batch_size, pruning_device)}
    atomic_write_json(METRICS / "pruning" / f"{name}.json", pruning)
    for row in pruning["curve"]:
        mlflow.log_metric("pruning_mean_accuracy", row["mean"], step=row["removed"])
    mlflow.log_artifact(str(METRICS / "pruning" / f"{name}.json"))
    return metrics, pruning, outcomes
