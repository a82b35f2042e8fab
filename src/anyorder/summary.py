"""The pipeline's summary table of evaluated runs (plain Python: no torch needed to read results)."""
from __future__ import annotations


def summary_table(runs: dict[str, dict]) -> dict:
    """Per-run results of `evaluate_orders` (plus "variant" and "seed") -> one summary: each
    run's sequential and arbitrary-order accuracy, the first sequential run as the baseline, its
    drop when shuffled, and every run's arbitrary mean as a fraction of the baseline's sequential
    accuracy."""
    baselines = [name for name, m in runs.items() if m["variant"] == "sequential"]
    baseline = runs[baselines[0]] if baselines else None
    summary: dict = {"baseline_run": baselines[0] if baselines else None, "runs": {}}
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
    return summary
