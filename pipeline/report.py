"""Stage `report`: one table of every evaluated run, against the sequential baseline.

Writes metrics/summary.json: per run the sequential and arbitrary-order accuracy, and for the
sequential baseline how far it collapses when shuffled; for every LayerShuffle run its mean
arbitrary-order accuracy as a fraction of the baseline's sequential accuracy.
"""
import json

from _stage import METRICS, begin, track

from anyorder.summary import summary_table
from anyorder.files import atomic_write_json


def main() -> None:
    stage = begin(__doc__, "report")
    runs = {name: json.loads((METRICS / "evaluate" / f"{name}.json").read_text())
            for name in stage.settings.finetune.runs}
    with track(stage) as mlflow:
        summary = summary_table(runs)
        atomic_write_json(METRICS / "summary.json", summary)
        for name, row in summary["runs"].items():
            mlflow.log_metrics({f"{name}.sequential": row["sequential"],
                                f"{name}.arbitrary_mean": row["arbitrary_mean"]})
        mlflow.log_artifact(str(METRICS / "summary.json"))
    print(f"{'run':<14}{'variant':<12}{'sequential':>11}{'arb mean':>10}{'arb min':>9}{'vs base':>9}")
    for name, row in summary["runs"].items():
        ratio = row.get("arbitrary_mean_vs_baseline_sequential", float("nan"))
        print(f"{name:<14}{row['variant']:<12}{row['sequential']:>11.4f}"
              f"{row['arbitrary_mean']:>10.4f}{row['arbitrary_min']:>9.4f}{ratio:>9.3f}")


if __name__ == "__main__":
    main()
