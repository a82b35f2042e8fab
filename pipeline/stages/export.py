"""Stage `export@<model>`: one ONNX graph per block (plus stem, head and a manifest) for a model of
export.models (by name: a fine-tuned run, or the selected model), and its validation twin: every
graph and chains of them against PyTorch (sequential and seeded random orders, batch 1 and 32),
and the runtime's test accuracy over the orders the evaluate stage used against PyTorch's. Writes
exports/<model>/ and metrics/export/<model>.json."""
from pipeline.stage import EXPORTS, METRICS, PREPARED, begin, read_json, track, user_errors

from anyorder.config import model_dir, model_evaluation
from anyorder.data.prepared import load_split
from anyorder.export.blocks import check_export, export_model, runtime_accuracy
from anyorder.files import atomic_write_json
from anyorder.model.checkpoint import load_model


def main() -> None:
    stage = begin(__doc__, "export", foreach="model")
    name, cfg = stage.args.model, stage.settings.export
    model_path = str(model_dir(stage.settings, name))
    with user_errors():
        model = load_model(model_path)
        evaluation = read_json(model_evaluation(stage.settings, name), "evaluate (or select)")
        images, labels = load_split(PREPARED, "test")
    accuracy = {"sequential": evaluation["sequential"], "arbitrary": evaluation["arbitrary"],
                "split": "test", "num_images": evaluation["num_images"],
                "order_seed": evaluation["order_seed"]}
    with track(stage) as mlflow:
        out = EXPORTS / name
        manifest = export_model(model, out, name, cfg.opset, accuracy,
                                extra={"source_model": model_path}, checkpoint_dir=model_path)
        check = check_export(model, out, cfg.check_orders, cfg.check_seed)
        check["runtime_test_accuracy"] = runtime_accuracy(out, evaluation, images, labels,
                                                      model.spec)
        metrics = {"model": name, "version": manifest["version"], "variant": manifest["variant"],
                   "opset": cfg.opset, **check}
        atomic_write_json(METRICS / "export" / f"{name}.json", metrics)
        runtime = check["runtime_test_accuracy"]
        mlflow.log_metrics({"max_abs_error": check["max_abs_error"],
                            "prediction_agreement": check["prediction_agreement"],
                            "runtime_sequential": runtime["sequential"],
                            "runtime_arbitrary_mean": runtime["arbitrary_mean"],
                            "runtime_vs_pytorch_points": runtime["max_difference_points"]})
        mlflow.log_artifact(str(METRICS / "export" / f"{name}.json"))
    print(f"{stage.name}: {manifest['depth']} blocks -> {out}; max |ONNX - PyTorch| "
          f"{check['max_abs_error']:.2e}, predictions agree {check['prediction_agreement']:.4f}; "
          f"runtime test accuracy {runtime['sequential']:.4f} sequential, "
          f"{runtime['arbitrary_mean']:.4f} over {runtime['orders'] - 1} orders "
          f"(max {runtime['max_difference_points']:.2f} points from PyTorch)")


if __name__ == "__main__":
    main()
