"""Stage `analysis`: how blocks behave depending on the slot they run at (the paper's analysis).

For every model of analysis.models: the accuracy drop when the block at slot s is skipped, per
slot (random orders for LayerShuffle models, the sequential order otherwise), and a 2-D
projection (analysis.projection: pca, or umap when umap-learn is installed) of one block's output
run at every slot, coloured by slot; for LS-pred models, the confusion matrix of predicted vs
actual slot. Writes metrics/analysis.json and plots/analysis/ (CSV + PNG), mirrored to MLflow.
"""
from pipeline.outputs import write, write_analysis_figures
from pipeline.stage import METRICS, PLOTS, PREPARED, begin, fail, track, user_errors

from anyorder.config import FINETUNED
from anyorder.data.prepared import load_split
from anyorder.device import resolve_device
from anyorder.evaluation.slot_analysis import analyse, check_analysis
from anyorder.model.checkpoint import load_model


def load_inputs(cfg):
    """Checks the settings (exit 2 on bad input) and loads the models and the test split;
    returns (device, models by name, images, labels)."""
    with user_errors():
        device = resolve_device(cfg.device, "analysis.device")
        if not cfg.models:
            fail("analysis.models: list at least one run of finetune.runs, e.g. ls_s0")
        models = {name: load_model(FINETUNED / name) for name in cfg.models}
        check_analysis(models, cfg)
        images, labels = load_split(PREPARED, "test")
    return device, models, images, labels


def main() -> None:
    stage = begin(__doc__, "analysis")
    cfg = stage.settings.analysis
    device, models, images, labels = load_inputs(cfg)
    with track(stage) as mlflow:
        results, projections, rows, confusions = analyse(models, images, labels, cfg, device)
        write(METRICS / "analysis.json", {"models": results})
        write(PLOTS / "analysis" / "slot_contribution.csv", rows)
        write_analysis_figures(mlflow, PLOTS / "analysis", results, projections, confusions, cfg)
        mlflow.log_artifact(str(METRICS / "analysis.json"))
        for name, r in results.items():
            mlflow.log_metric(f"{name}.slot_separation", r["projection"]["slot_separation"])
    for name, r in results.items():
        drops = ", ".join(f"{100 * d:.1f}" for d in r["slot_contribution"]["drop_per_slot"])
        print(f"analysis: {name}: points lost per skipped slot [{drops}]; slot separation of "
              f"block {cfg.block}'s output {r['projection']['slot_separation']:.2f}")


if __name__ == "__main__":
    main()
