"""Stage `report`: one table of every evaluated run, against the sequential baseline.

Writes metrics/summary.json: per run the sequential and arbitrary-order accuracy, and for the
sequential baseline how far it collapses when shuffled; for every LayerShuffle run its mean
arbitrary-order accuracy as a fraction of the baseline's sequential accuracy.
"""
import json

from _stage import METRICS, mlflow_stage, parse_args, settings_or_exit

from anyorder.checkpoint import atomic_write_json


def main() -> None:
    args = parse_args(__doc__)
    settings = settings_or_exit(args.params)
    runs = {name: json.loads((METRICS / "evaluate" / f"{name}.json").read_text())
            for name in settings.finetune.runs}
    baselines = [name for name, m in runs.items() if m["variant"] == "sequential"]
    baseline = runs[baselines[0]] if baselines else None
    summary = {"baseline_run": baselines[0] if baselines else None, "runs": {}}
    for name, m in runs.items():
        row = {"variant": m["variant"], "seed": m["seed"], "sequential": m["sequential"],
               "arbitrary_mean": m["arbitrary"]["mean"], "arbitrary_std": m["arbitrary"]["std"],
               "arbitrary_min": m["arbitrary"]["min"], "arbitrary_max": m["arbitrary"]["max"],
               "num_orders": m["arbitrary"]["count"]}
        if baseline is not None:
            row["arbitrary_mean_vs_baseline_sequential"] = (
                m["arbitrary"]["mean"] / baseline["sequential"])
        summary["runs"][name] = row
    if baseline is not None:
        summary["baseline_shuffle_drop"] = baseline["sequential"] - baseline["arbitrary"]["mean"]
    atomic_write_json(METRICS / "summary.json", summary)
    with mlflow_stage("report", settings, args.params) as mlflow:
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
