"""Stage `evaluate@<run>`: test accuracy in sequential order and over many seeded random orders,
and the run's robustness (corruptions, attacks, nullspace invariance).

Writes metrics/evaluate/<run>.json (summary + the exact orders), plots/orders/<run>.csv
(accuracy per order, a DVC plot) and metrics/robustness/<run>.json.
"""
import json

from _robustness import check_synthesis, evaluate_and_write, load_corrupted
from _stage import FINETUNED, METRICS, PLOTS, PREPARED, begin, track, user_errors

from anyorder.checkpoint import SPEC, load_model
from anyorder.data import load_split
from anyorder.evaluate import evaluate_orders
from anyorder.files import atomic_write_csv, atomic_write_json
from anyorder.tensors import resolve_device


def main() -> None:
    stage = begin(__doc__, "evaluate", foreach="run")
    run_name, cfg = stage.args.run, stage.settings.evaluate
    with user_errors():
        device = resolve_device(cfg.device, "evaluate.device")
        robustness_device = resolve_device(stage.settings.robustness.device, "robustness.device")
        check_synthesis(stage.settings)
        load_corrupted(stage.settings)
        images, labels = load_split(PREPARED, "test")
    model_dir = FINETUNED / run_name
    model = load_model(model_dir)
    trained = json.loads((model_dir / SPEC).read_text())["training"]
    with track(stage) as mlflow:
        result = evaluate_orders(model, images, labels, cfg.num_orders, cfg.order_seed,
                                 cfg.batch_size, device)
        metrics = {"run": run_name, "variant": model.variant, "seed": trained["seed"], **result}
        atomic_write_json(METRICS / "evaluate" / f"{run_name}.json", metrics)
        atomic_write_csv(PLOTS / "orders" / f"{run_name}.csv", [
            {"order_index": i, "accuracy": acc, "order": "-".join(map(str, order))}
            for i, (order, acc) in enumerate(zip(result["orders"], result["order_accuracies"]))])
        arbitrary = result["arbitrary"]
        mlflow.log_metrics({"test_accuracy_sequential": result["sequential"],
                            **{f"test_accuracy_arbitrary_{k}": v for k, v in arbitrary.items()
                               if k != "count"}})
        mlflow.log_artifact(str(METRICS / "evaluate" / f"{run_name}.json"))
        robust = evaluate_and_write(stage.settings, model, run_name, robustness_device, mlflow)
    print(f"{stage.name}: sequential {result['sequential']:.4f}, arbitrary mean "
          f"{arbitrary['mean']:.4f} (min {arbitrary['min']:.4f}) over {arbitrary['count']} orders; "
          f"mean corruption accuracy {robust['corruptions']['mean_corruption_accuracy']}")


if __name__ == "__main__":
    main()
