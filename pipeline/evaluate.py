"""Stage `evaluate@<run>`: test accuracy in sequential order and over many seeded random orders.

Writes metrics/evaluate/<run>.json (summary + the exact orders) and plots/orders/<run>.csv
(accuracy per order, a DVC plot).
"""
from _stage import (FINETUNED, METRICS, PLOTS, PREPARED, mlflow_stage, parse_args, run_or_exit,
                    settings_or_exit, write_rows_csv)

from anyorder.checkpoint import atomic_write_json, load_model
from anyorder.data import load_split
from anyorder.evaluate import evaluate_orders
from anyorder.tensors import resolve_device


def main() -> None:
    args = parse_args(__doc__, with_run=True)
    settings = settings_or_exit(args.params)
    run = run_or_exit(settings, args.run)
    cfg = settings.evaluate
    model = load_model(FINETUNED / args.run)
    images, labels = load_split(PREPARED, "test")
    result = evaluate_orders(model, images, labels, cfg.num_orders, cfg.order_seed,
                             cfg.batch_size, resolve_device(cfg.device))
    metrics = {"run": args.run, "variant": run.variant, "seed": run.seed, **result}
    atomic_write_json(METRICS / "evaluate" / f"{args.run}.json", metrics)
    write_rows_csv(PLOTS / "orders" / f"{args.run}.csv", [
        {"order_index": i, "accuracy": acc, "order": "-".join(map(str, order))}
        for i, (order, acc) in enumerate(zip(result["orders"], result["order_accuracies"]))])
    params = {"run": args.run, "variant": run.variant, "evaluate": settings.to_dict()["evaluate"]}
    with mlflow_stage(f"evaluate@{args.run}", settings, args.params, params) as mlflow:
        arbitrary = result["arbitrary"]
        mlflow.log_metrics({"test_accuracy_sequential": result["sequential"],
                            **{f"test_accuracy_arbitrary_{k}": v for k, v in arbitrary.items()
                               if k != "count"}})
        mlflow.log_artifact(str(METRICS / "evaluate" / f"{args.run}.json"))
    print(f"evaluate@{args.run}: sequential {result['sequential']:.4f}, arbitrary mean "
          f"{arbitrary['mean']:.4f} (min {arbitrary['min']:.4f}) over {arbitrary['count']} orders")


if __name__ == "__main__":
    main()
