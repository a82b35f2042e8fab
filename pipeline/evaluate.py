"""Stage `evaluate@<run>`: test accuracy in sequential order and over many seeded random orders,
the pruning curve (k blocks removed), and the run's robustness (corruptions, attacks, nullspace
invariance).

Writes metrics/evaluate/<run>.json (summary + the exact orders), plots/orders/<run>.csv
(accuracy per order, a DVC plot), metrics/pruning/<run>.json, metrics/robustness/<run>.json and
metrics/outcomes/<run>.json (every test image right or wrong, per order, corruption and attack:
what the report's intervals resample).
"""
import json

from _evaluation import evaluate_and_prune
from _robustness import evaluate_and_write, load_corrupted
from _stage import FINETUNED, METRICS, PREPARED, begin, track, user_errors

from anyorder.model.checkpoint import SPEC, load_model
from anyorder.data.prepared import load_split
from anyorder.files import atomic_write_json
from anyorder.evaluation.intervals import pack_tree
from anyorder.device import resolve_device


def main() -> None:
    stage = begin(__doc__, "evaluate", foreach="run")
    run_name, cfg = stage.args.run, stage.settings.evaluate
    with user_errors():
        device = resolve_device(cfg.device, "evaluate.device")
        pruning_device = resolve_device(stage.settings.pruning.device, "pruning.device")
        robustness_device = resolve_device(stage.settings.robustness.device, "robustness.device")
        load_corrupted(stage.settings)
        test = load_split(PREPARED, "test")
    model_dir = FINETUNED / run_name
    model = load_model(model_dir)
    trained = json.loads((model_dir / SPEC).read_text())["training"]
    epochs = {"fine_tune_epochs": trained["config"]["epochs"]}
    with track(stage) as mlflow:
        result, pruning, orders = evaluate_and_prune(stage.settings, model, run_name,
                                                     trained["seed"], test, device,
                                                     pruning_device, mlflow, extra=epochs)
        robust, robustness = evaluate_and_write(stage.settings, model, run_name,
                                                robustness_device, mlflow, extra=epochs)
        atomic_write_json(METRICS / "outcomes" / f"{run_name}.json",
                          pack_tree({"orders": orders, "robustness": robustness}))
    arbitrary = result["arbitrary"]
    print(f"{stage.name}: sequential {result['sequential']:.4f}, arbitrary mean "
          f"{arbitrary['mean']:.4f} (min {arbitrary['min']:.4f}) over {arbitrary['count']} orders; "
          f"pruned by 1/4: {pruning['curve'][model.depth // 4]['mean']:.4f}; "
          f"mean corruption accuracy {robust['corruptions']['mean_corruption_accuracy']}")


if __name__ == "__main__":
    main()
