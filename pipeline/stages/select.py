"""Stage `select`: the best fine-tuned run of one variant (select.variant), chosen by its mean
accuracy over seeded random orders on the validation split (the test split never decides), copied
to models/selected/<select.name> with `selection.json` (every candidate's score) and
`evaluate.json` (the chosen run's test evaluation, for the export's manifest)."""
import shutil

from pipeline.stage import METRICS, PREPARED, begin, fail, read_json, track, user_errors

from anyorder.config import FINETUNED, SELECTED
from anyorder.data.prepared import load_split
from anyorder.device import resolve_device
from anyorder.evaluation.accuracy import select_best
from anyorder.files import atomic_directory, atomic_write_json
from anyorder.model.checkpoint import load_model


def main() -> None:
    stage = begin(__doc__, "select")
    cfg, runs = stage.settings.select, stage.settings.finetune.runs
    candidates = [name for name, run in runs.items() if run.variant == cfg.variant]
    with user_errors():
        if not candidates:
            fail(f"select.variant: finetune.runs has no run of variant {cfg.variant!r}")
        device = resolve_device(cfg.device, "select.device")
        images, labels = load_split(PREPARED, "val")
        models = {name: load_model(FINETUNED / name) for name in candidates}
        for name in candidates:
            read_json(METRICS / "evaluate" / f"{name}.json", f"evaluate@{name}")
    with track(stage) as mlflow:
        best, scores = select_best(models, images, labels, cfg.num_orders, cfg.order_seed,
                                   cfg.batch_size, device)
        with atomic_directory(SELECTED / cfg.name) as out:
            for file in sorted((FINETUNED / best).iterdir()):
                shutil.copy2(file, out / file.name)
            shutil.copy2(METRICS / "evaluate" / f"{best}.json", out / "evaluate.json")
            atomic_write_json(out / "selection.json", {
                "chosen": best, "variant": cfg.variant, "split": "val",
                "criterion": "mean accuracy over the orders", "num_orders": cfg.num_orders,
                "order_seed": cfg.order_seed, "candidates": scores})
        mlflow.log_metrics({f"val_arbitrary_mean.{name}": score["mean"]
                            for name, score in scores.items()})
        mlflow.set_tag("anyorder.selected", best)
    print(f"select: {best} (validation accuracy over {cfg.num_orders} orders: " + ", ".join(
        f"{name} {score['mean']:.4f}" for name, score in scores.items()) + ")")


if __name__ == "__main__":
    main()
