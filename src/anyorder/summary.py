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


def _mce(own: dict, base: dict, mode: str) -> float:
    """Mean over corruptions of (errors summed over severities) / the baseline's, sequential."""
    ratios = [own[name][mode] / base[name]["sequential"] for name in own
              if mode in own[name] and base.get(name, {}).get("sequential")]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def robustness_table(models: dict[str, dict], baseline: str) -> dict:
    """Per model (metrics/robustness/<name>.json contents) and mode: clean accuracy, mean
    corruption accuracy, mCE relative to `baseline` (its sequential errors; 1.0 = as robust as
    the baseline, lower is better), attack accuracy per budget, and nullspace invariance."""
    base = models[baseline]["corruptions"]["errors"]
    table: dict = {"baseline": baseline, "models": {}}
    for name, m in models.items():
        rows = {}
        for mode in m["modes"]:
            row = {"clean": m["clean_accuracy"][mode],
                   "mean_corruption_accuracy": m["corruptions"]["mean_corruption_accuracy"][mode],
                   "mce_vs_baseline": _mce(m["corruptions"]["errors"], base, mode)}
            for attack, by_eps in m["adversarial"]["accuracy"].items():
                for eps, by_mode in by_eps.items():
                    row[f"{attack}@{eps}"] = by_mode[mode]
            row["exact_nullspace_max_relative_logit_change"] = (
                m["nullspace"]["exact"][mode]["relative_logit_change_max"])
            row["exact_nullspace_predictions_changed"] = (
                m["nullspace"]["exact"][mode]["predictions_changed"])
            row["synthesised_noise_accuracy"] = m["nullspace"]["synthesised"][mode][
                "noisy_accuracy"]
            if "start_clean_accuracy" in m:
                row["clean_vs_start"] = m["clean_accuracy"][mode] / m["start_clean_accuracy"][mode]
            rows[mode] = row
        table["models"][name] = {"variant": m["variant"], **rows}
    return table


def robustness_markdown(table: dict, columns: list[str]) -> str:
    """The table as markdown: one row per model and mode."""
    head = ["model", "variant", "mode"] + columns
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, entry in table["models"].items():
        for mode, row in entry.items():
            if mode == "variant":
                continue
            cells = [name, entry["variant"], mode] + [_number(row.get(c)) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    """4 decimals; tiny values (round-off) in scientific notation so they do not read as 0."""
    if not isinstance(value, float):
        return "" if value is None else str(value)
    return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
