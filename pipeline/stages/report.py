"""Stage `report`: the summary tables of every evaluated model, and the report page
metrics/report.md (every model's headline numbers and the plots: orders, pruning, merging,
robustness, analysis; the PNGs beside it under plots/).

Writes metrics/summary.json (per run: sequential and arbitrary-order accuracy against the
baseline run named by report.baseline, the differences with 95% intervals over test images and
orders from metrics/outcomes/), metrics/robustness_summary.json and metrics/robustness.md (per
model and evaluation mode: clean accuracy, mean corruption accuracy, mCE relative to the
baseline, FGSM/PGD accuracy per budget, nullspace invariance and whether the noise synthesis
converged; then the differences from the baseline with their intervals), and the plots
plots/robustness/{severity,adversarial}.{csv,png} (accuracy vs severity per corruption family;
accuracy vs eps), all mirrored to MLflow.
"""
from pipeline.outputs import write, write_report_figures
from pipeline.stage import METRICS, PLOTS, begin, read_json, read_jsons, track

from anyorder.evaluation.intervals import unpack_tree
from anyorder.report import (kind_of, merge_summary, pruning_rows, report_markdown, summary_lines,
                             summary_table)
from anyorder.robustness.report import plot_rows, robustness_page


def main() -> None:
    stage = begin(__doc__, "report")
    settings, baseline = stage.settings, stage.settings.report.baseline
    finetune_runs, merges = settings.finetune.runs, settings.merge.models
    names = list(finetune_runs) + list(settings.nullspace.arms)
    evaluated = list(finetune_runs) + list(merges)
    runs = read_jsons(METRICS / "evaluate", evaluated, "evaluate@{}")
    robust = read_jsons(METRICS / "robustness", names, "{}")
    curves = read_jsons(METRICS / "pruning", evaluated, "{}")
    cards = read_jsons(METRICS / "merge", merges, "merge@{}")
    analysis = read_json(METRICS / "analysis.json", "analysis")
    outcomes = {name: unpack_tree(packed) for name, packed in read_jsons(
        METRICS / "outcomes", dict.fromkeys(names + evaluated), "{}").items()}
    with track(stage) as mlflow:
        summary = write(METRICS / "summary.json", summary_table(runs, baseline, outcomes))
        for name, row in summary["runs"].items():
            mlflow.log_metrics({f"{name}.sequential": row["sequential"],
                                f"{name}.arbitrary_mean": row["arbitrary_mean"]})
        table, robustness_md = robustness_page(robust, baseline, outcomes)
        write(METRICS / "robustness_summary.json", table)
        write(METRICS / "robustness.md", robustness_md)
        severity, adversarial = plot_rows(robust)
        write(PLOTS / "robustness" / "severity.csv", severity)
        write(PLOTS / "robustness" / "adversarial.csv", adversarial)
        pruning = write(PLOTS / "pruning" / "curves.csv", pruning_rows(
            curves, {name: kind_of(name, finetune_runs, merges) for name in curves}))
        merge_table = write(METRICS / "merge_summary.json", merge_summary(cards, runs, outcomes))
        figures = write_report_figures(mlflow, severity, adversarial, pruning, runs)
        write(METRICS / "report.md", report_markdown(summary, pruning, merge_table, analysis,
                                                     robustness_md, figures))
        for name in ("summary.json", "robustness.md", "report.md"):
            mlflow.log_artifact(str(METRICS / name))
    print(summary_lines(summary, merge_table) + f"\nreport: {METRICS / 'report.md'}")


if __name__ == "__main__":
    main()
