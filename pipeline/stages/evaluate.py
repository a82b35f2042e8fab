"""Stage `evaluate@<run>`: test accuracy in sequential order and over many seeded random orders,
the pruning curve (k blocks removed), and the run's robustness (corruptions, attacks, nullspace
invariance).

Writes metrics/evaluate/<run>.json (summary + the exact orders), plots/orders/<run>.csv
(accuracy per order, a DVC plot), metrics/pruning/<run>.json, metrics/robustness/<run>.json and
metrics/outcomes/<run>.json (every test image right or wrong, per order, corruption and attack:
what the report's intervals resample).
"""
from pipeline.outputs import write, write_evaluation, write_robustness
from pipeline.stage import METRICS, PREPARED, begin, load_corrupted, track, user_errors

from anyorder.config import FINETUNED
from anyorder.data.prepared import load_split
from anyorder.device import resolve_device
from anyorder.evaluation.intervals import pack_tree
from anyorder.evaluation.record import evaluate_and_prune
from anyorder.model.checkpoint import load_model, training_record
from anyorder.robustness.record import robustness_record


def main() -> None:
    stage = begin(__doc__, "evaluate", foreach="run")
    run_name, settings = stage.args.run, stage.settings
    with user_errors():
        device = resolve_device(settings.evaluate.device, "evaluate.device")
        pruning_device = resolve_device(settings.pruning.device, "pruning.device")
        robustness_device = resolve_device(settings.robustness.device, "robustness.device")
        corrupted = load_corrupted(settings)
        test = load_split(PREPARED, "test")
    model = load_model(FINETUNED / run_name)
    trained = training_record(FINETUNED / run_name)
    epochs = {"fine_tune_epochs": trained["config"]["epochs"]}
    with track(stage) as mlflow:
        result, pruning, orders = evaluate_and_prune(
            settings.evaluate, settings.pruning, model, run_name, trained["seed"], test, device,
            pruning_device, extra=epochs)
        write_evaluation(mlflow, result, pruning)
        train_images, _ = load_split(PREPARED, "train")
        robust, robustness = robustness_record(settings.robustness, model, run_name, test,
                                               train_images, corrupted, robustness_device,
                                               extra=epochs)
        write_robustness(mlflow, robust)
        write(METRICS / "outcomes" / f"{run_name}.json",
              pack_tree({"orders": orders, "robustness": robustness}))
    arbitrary = result["arbitrary"]
    print(f"{stage.name}: sequential {result['sequential']:.4f}, arbitrary mean "
          f"{arbitrary['mean']:.4f} (min {arbitrary['min']:.4f}) over {arbitrary['count']} orders; "
          f"pruned by 1/4: {pruning['curve'][model.depth // 4]['mean']:.4f}; "
          f"mean corruption accuracy {robust['corruptions']['mean_corruption_accuracy']}")


if __name__ == "__main__":
    main()
