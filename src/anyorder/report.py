"""The pipeline's summary tables of evaluated runs (numpy and plain Python: no torch needed to
read results). Differences between models come with 95% intervals over test images (and orders)
from the per-image outcomes (anyorder.evaluation.intervals) where the caller passes them."""
from __future__ import annotations

from typing import Optional

import numpy as np

from anyorder.evaluation.intervals import corruption_errors, difference, mce_interval


def summary_table(runs: dict[str, dict], baseline: str,
                  outcomes: Optional[dict[str, dict]] = None) -> dict:
    """Per-run results of `evaluate_orders` (plus "variant", "seed", "fine_tune_epochs") -> one
    summary: each run's sequential and arbitrary-order accuracy, the baseline run named (its
    drop when shuffled), every run's arbitrary mean as a fraction of the baseline's sequential
    accuracy, and, with `outcomes` (name -> unpacked metrics/outcomes/<name>.json), each run's
    random-order mean minus the baseline's sequential accuracy with a 95% interval over test
    images and orders. A run trained for another number of fine-tune epochs than the baseline is
    flagged (`equal_budget`: false): a comparison at unequal budgets is not a comparison."""
    if baseline not in runs:
        raise KeyError(f"the baseline run {baseline!r} was not evaluated (evaluated: "
                       f"{', '.join(runs)})")
    base = runs[baseline]
    summary: dict = {"baseline_run": baseline,
                     "baseline_fine_tune_epochs": base.get("fine_tune_epochs"), "runs": {}}
    for name, m in runs.items():
        row = {"variant": m["variant"], "seed": m["seed"], "sequential": m["sequential"],
               "arbitrary_mean": m["arbitrary"]["mean"], "arbitrary_std": m["arbitrary"]["std"],
               "arbitrary_min": m["arbitrary"]["min"], "arbitrary_max": m["arbitrary"]["max"],
               "num_orders": m["arbitrary"]["count"], "depth": m.get("depth"),
               "fine_tune_epochs": m.get("fine_tune_epochs"),
               "equal_budget": str(m.get("fine_tune_epochs")) == str(base.get("fine_tune_epochs")),
               "arbitrary_mean_vs_baseline_sequential": m["arbitrary"]["mean"] / base["sequential"]}
        if outcomes is not None:
            row["arbitrary_minus_baseline_sequential"] = difference(
                np.stack(outcomes[name]["orders"]["random_orders"]),
                outcomes[baseline]["orders"]["sequential"])
            row["sequential_minus_baseline_sequential"] = difference(
                outcomes[name]["orders"]["sequential"], outcomes[baseline]["orders"]["sequential"])
        summary["runs"][name] = row
    summary["baseline_shuffle_drop"] = base["sequential"] - base["arbitrary"]["mean"]
    return summary


def _mce(own: dict, base: dict, mode: str, num_images: int) -> float:
    """Mean over corruptions of (errors summed over severities) / the baseline's, sequential;
    a corruption on which the baseline made no error counts it as one image wrong
    (anyorder.evaluation.intervals.mce: none is dropped)."""
    ratios = [own[name][mode] / max(base[name]["sequential"], 1.0 / num_images) for name in own]
    return sum(ratios) / len(ratios)


# Attack columns with an interval in the differences table (the budgets the figure shows).
DIFFERENCE_ATTACKS = ("fgsm@4/255", "pgd@4/255")


def robustness_table(models: dict[str, dict], baseline: str,
                     outcomes: Optional[dict[str, dict]] = None) -> dict:
    """Per model (metrics/robustness/<name>.json contents) and mode: clean accuracy, mean
    corruption accuracy, mCE relative to `baseline` (its sequential errors; 1.0 = as robust as
    the baseline, lower is better; every corruption counted), attack accuracy per budget, and
    nullspace invariance. With `outcomes` (name -> unpacked outcomes, their "robustness" part),
    also the differences from the baseline (sequential) with 95% intervals over test images:
    clean, mean corruption accuracy, the attacks of DIFFERENCE_ATTACKS, and mCE's own interval."""
    if baseline not in models:
        raise KeyError(f"the baseline {baseline!r} has no robustness metrics (models: "
                       f"{', '.join(models)})")
    base = models[baseline]["corruptions"]["errors"]
    table: dict = {"baseline": baseline, "models": {}}
    for name, m in models.items():
        rows = {}
        for mode in m["modes"]:
            row = {"fine_tune_epochs": m.get("fine_tune_epochs"),
                   "clean": m["clean_accuracy"][mode],
                   "mean_corruption_accuracy": m["corruptions"]["mean_corruption_accuracy"][mode],
                   "mce_vs_baseline": _mce(m["corruptions"]["errors"], base, mode,
                                           m["num_images_attacked_and_corrupted"])}
            for attack, by_eps in m["adversarial"]["accuracy"].items():
                for eps, by_mode in by_eps.items():
                    row[f"{attack}@{eps}"] = by_mode[mode]
            row["exact_nullspace_max_relative_logit_change"] = (
                m["nullspace"]["exact"][mode]["relative_logit_change_max"])
            row["exact_nullspace_predictions_changed"] = (
                m["nullspace"]["exact"][mode]["predictions_changed"])
            synthesised = m["nullspace"]["synthesised"]
            row["synthesised_noise_accuracy"] = synthesised[mode]["noisy_accuracy"]
            row["synthesis_converged"] = synthesised["synthesis"]["converged"]
            if "training_synthesis" in m:
                row["training_synthesis_converged"] = m["training_synthesis"][
                    "converged_every_epoch"]
            if "start_clean_accuracy" in m:
                row["clean_vs_start"] = m["clean_accuracy"][mode] / m["start_clean_accuracy"][mode]
            if outcomes is not None:
                row["differences"] = robustness_differences(outcomes[name][mode],
                                                            outcomes[baseline]["sequential"])
            rows[mode] = row
        table["models"][name] = {"variant": m["variant"], **rows}
    return table


def robustness_differences(own: dict, base: dict) -> dict:
    """One model-mode's robustness outcomes against the baseline's: differences of clean,
    mean corruption accuracy and DIFFERENCE_ATTACKS accuracy (test images resampled, paired;
    the corruption sets are a fixed benchmark, not resampled), and mCE with its interval."""
    def sets(outcome: dict) -> np.ndarray:
        return np.stack([hits for by_severity in outcome["corruptions"].values()
                         for hits in by_severity.values()])

    out = {"clean": difference(own["clean"], base["clean"]),
           "mean_corruption_accuracy": difference(sets(own), sets(base), resample_rows=False),
           "mce_vs_baseline": mce_interval(corruption_errors(own["corruptions"]),
                                           corruption_errors(base["corruptions"]))}
    for column in DIFFERENCE_ATTACKS:
        attack, eps = column.split("@")
        if eps in own["attacks"].get(attack, {}) and eps in base["attacks"].get(attack, {}):
            out[column] = difference(own["attacks"][attack][eps], base["attacks"][attack][eps])
    return out


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


def synthesis_markdown(models: dict[str, dict]) -> str:
    """The noise every nullspace fine-tuning epoch trained on (metrics/robustness/<arm>.json,
    "training_synthesis"): one row per arm and epoch."""
    rows = [[name, str(r["epoch"]), str(r["steps"]), r["distance"], r["random_distance"],
             f"{r['start_norm']:.1f} -> {r['norm']:.1f}", r["moved_from_start"],
             r["distance_to_random"], "yes" if r["converged"] else "**no**"]
            for name, m in models.items() if "training_synthesis" in m
            for r in m["training_synthesis"]["epochs"]]
    if not rows:
        return ""
    return _table(["arm", "epoch", "steps", "distance (check set)", "random noise, same norm",
                   "norm: start -> end", "moved from start", "from the random noise",
                   "converged"], rows)


def interval_text(value: Optional[dict], points: bool = True) -> str:
    """An interval from anyorder.evaluation.intervals as text: "+1.23 [-0.40, +2.86]" (differences, in
    points) or "0.952 [0.881, 1.020]" (a ratio such as mCE)."""
    if not value:
        return ""
    if points:
        return (f"{100 * value['value']:+.2f} [{100 * value['low']:+.2f}, "
                f"{100 * value['high']:+.2f}]")
    return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


DIFFERENCE_COLUMNS = ("clean", "mean_corruption_accuracy", "mce_vs_baseline", *DIFFERENCE_ATTACKS)


def differences_markdown(table: dict) -> str:
    """Every model and mode against the baseline (sequential): differences in points and mCE,
    each with its 95% interval over test images (rows where outcomes were given)."""
    head = ["model", "mode", "fine-tune epochs"] + [
        c if c == "mce_vs_baseline" else f"{c} (points)" for c in DIFFERENCE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, entry in table["models"].items():
        for mode, row in entry.items():
            if mode == "variant" or "differences" not in row or (
                    name == table["baseline"] and mode == "sequential"):
                continue
            cells = [name, mode, str(row.get("fine_tune_epochs", ""))] + [
                interval_text(row["differences"].get(c), points=c != "mce_vs_baseline")
                for c in DIFFERENCE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    """4 decimals; tiny values (round-off) in scientific notation so they do not read as 0."""
    if not isinstance(value, float):
        return "" if value is None else str(value)
    return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


# -- pruning, merging and the report page ---------------------------------------------------------

def kind_of(name: str, runs: dict, merges) -> str:
    """What a model is, for the pruning plot: merged (a merge entry), shallow, layerdrop,
    sequential or layershuffle (from its entry of finetune.runs)."""
    if name in merges:
        return "merged"
    run = runs[name]
    if run.depth is not None:
        return "shallow"
    if run.layerdrop_rate:
        return "layerdrop"
    return "sequential" if run.variant == "sequential" else "layershuffle"


def pruning_rows(curves: dict[str, dict], kinds: dict[str, str]) -> list[dict]:
    """One row per model and number of blocks run: the pruning curves on one axis. `kinds` says
    what each model is (sequential, layerdrop, shallow, layershuffle, merged)."""
    rows = []
    for name, c in curves.items():
        kind = kinds[name]
        for row in c["curve"]:
            rows.append({"model": name, "kind": kind, "variant": c["variant"],
                         "blocks_run": row["kept"], "removed": row["removed"],
                         "accuracy": row["mean"], "std": row["std"], "min": row["min"],
                         "max": row["max"], "count": row["count"]})
    return rows


def kept_at(rows: list[dict], model: str, blocks_run: int) -> float | None:
    """Mean accuracy of `model` running `blocks_run` blocks, as a fraction of its unpruned mean."""
    own = {r["blocks_run"]: r["accuracy"] for r in rows if r["model"] == model}
    full = own[max(own)]
    return own[blocks_run] / full if blocks_run in own and full else None


def merge_summary(cards: dict[str, dict], runs: dict[str, dict],
                  outcomes: Optional[dict[str, dict]] = None) -> dict:
    """Per merged model: validation (merged, best source, sources' mean) and test (merged mean
    over the evaluate stage's orders vs the mean of its sources' means over the same orders,
    where those sources were evaluated by evaluate@<run>; with `outcomes`, that difference with
    a 95% interval over test images and orders)."""
    out = {}
    for name, card in cards.items():
        sources = list(card["sources"])
        tested = [runs[s]["arbitrary"]["mean"] for s in sources if s in runs]
        row = {"generator": card["generator"], "seed": card["seed"], "sources": sources,
               "slots": [f"{s['source']}:{s['block']}" for s in card["recipe"]["slots"]],
               "val_merged": card["validation"]["merged"],
               "val_best_source": card["validation"]["best_source"],
               "val_sources_mean": card["validation"]["sources_mean"],
               "test_merged_mean": card["test"]["arbitrary"]["mean"],
               "test_merged_min": card["test"]["arbitrary"]["min"],
               "test_num_orders": card["test"]["arbitrary"]["count"]}
        if len(tested) == len(sources):
            row["test_sources_mean"] = sum(tested) / len(tested)
            row["test_best_source"] = max(tested)
            row["test_merged_minus_sources_points"] = 100 * (row["test_merged_mean"]
                                                             - row["test_sources_mean"])
            if outcomes is not None:
                row["test_merged_minus_sources"] = difference(
                    np.stack(outcomes[name]["orders"]["random_orders"]),
                    np.concatenate([np.stack(outcomes[s]["orders"]["random_orders"])
                                    for s in sources]))
        out[name] = row
    return out


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_number(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _quarter_pruned(pruning: list[dict]) -> dict:
    """Per model: the fraction of its unpruned mean kept with a quarter of its blocks removed."""
    quarter = {}
    for model in {r["model"] for r in pruning}:
        depth = max(r["blocks_run"] for r in pruning if r["model"] == model)
        quarter[model] = kept_at(pruning, model, depth - depth // 4)
    return quarter


def _models_section(summary: dict, pruning: list[dict]) -> list[str]:
    """The page's title, its introduction and the table of every model's headline numbers."""
    quarter = _quarter_pruned(pruning)
    return ["# anyorder pipeline report\n",
            "Written by the `report` stage from the metrics of this run (test split unless a "
            "column says otherwise). Random orders: the evaluate stage's seeded orders. "
            "Pruned by 1/4: mean accuracy with a quarter of the blocks removed (random subsets; "
            "random orders for LayerShuffle models), as a fraction of the unpruned mean.\n",
            "## Models\n",
            f"Baseline: `{summary['baseline_run']}` (report.baseline), "
            f"{summary['baseline_fine_tune_epochs']} fine-tune epochs. The difference column is "
            f"a model's mean over the random orders minus the baseline's sequential accuracy, in "
            f"points, with a 95% bootstrap interval over test images and orders. A model "
            f"trained for another number of epochs than the baseline is marked *.\n",
            _table(["model", "variant", "blocks", "fine-tune epochs", "sequential",
                    "random orders: mean", "worst", "random orders - baseline (points)",
                    "pruned by 1/4 keeps"],
                   [[name, row["variant"], str(row.get("depth", "")),
                     f"{row.get('fine_tune_epochs', '')}{'' if row['equal_budget'] else ' *'}",
                     row["sequential"], row["arbitrary_mean"], row["arbitrary_min"],
                     interval_text(row.get("arbitrary_minus_baseline_sequential")),
                     quarter.get(name)]
                    for name, row in summary["runs"].items()])]


def _merges_section(merges: dict) -> list[str]:
    """The Frankenstein merges: validation and test against their sources, and each recipe."""
    return ["\n## Frankenstein merges\n",
            _table(["merged", "generator", "val: merged", "val: best source",
                    "test: merged mean", "test: sources' mean",
                    "difference (points, 95% interval)", "recipe (slot: source:block)"],
                   [[name, m["generator"], m["val_merged"], m["val_best_source"],
                     m["test_merged_mean"], m.get("test_sources_mean"),
                     interval_text(m.get("test_merged_minus_sources")) or
                     m.get("test_merged_minus_sources_points"), " ".join(m["slots"])]
                    for name, m in merges.items()])]


def _analysis_section(analysis: dict, figures: dict[str, str]) -> list[str]:
    """Per model: the slot whose skipping costs most and least, the slot separation, and the
    analysis plots."""
    parts = ["\n## Analysis: blocks and the slot they run at\n",
             _table(["model", "variant", "largest drop when one slot is skipped (points)",
                     "at slot", "smallest", "slot separation of a block's output"],
                    [[name, a["variant"],
                      100 * max(a["slot_contribution"]["drop_per_slot"]),
                      str(int(max(range(len(a["slot_contribution"]["drop_per_slot"])),
                                  key=a["slot_contribution"]["drop_per_slot"].__getitem__))),
                      100 * min(a["slot_contribution"]["drop_per_slot"]),
                      a["projection"]["slot_separation"]]
                     for name, a in analysis["models"].items()])]
    parts += [f"\n![{name}]({path})\n" for name, path in figures.items()
              if name.startswith(("slot_", "projection"))]
    return parts


def report_markdown(summary: dict, pruning: list[dict], merges: dict, analysis: Optional[dict],
                    robustness_md: str, figures: dict[str, str]) -> str:
    """The pipeline's report page: every model's headline numbers and the plots, as Markdown
    with the PNGs beside it (`figures`: name -> path relative to the page)."""
    parts = _models_section(summary, pruning)
    if "orders" in figures:
        parts += ["\n## Accuracy per order\n", f"![accuracy per order]({figures['orders']})\n"]
    parts += ["\n## Pruning\n", "Accuracy against the number of blocks run: LayerShuffle models "
              "keep the kept blocks in a random order, the sequential baseline and LayerDrop in "
              "sequential order; shallow models are trained at their depth.\n"]
    if "pruning" in figures:
        parts.append(f"![pruning]({figures['pruning']})\n")
    if merges:
        parts += _merges_section(merges)
    parts += ["\n## Robustness\n", robustness_md]
    for name in ("severity", "adversarial"):
        if name in figures:
            parts.append(f"\n![{name}]({figures[name]})\n")
    if analysis:
        parts += _analysis_section(analysis, figures)
    return "\n".join(parts)


def summary_lines(summary: dict, merge_table: dict) -> str:
    """The summary and the merges as the report stage prints them: one line per run (sequential,
    random-order mean and minimum, mean against the baseline's sequential) and per merge."""
    lines = [f"{'run':<14}{'variant':<12}{'sequential':>11}{'arb mean':>10}{'arb min':>9}"
             f"{'vs base':>9}"]
    for name, row in summary["runs"].items():
        ratio = row.get("arbitrary_mean_vs_baseline_sequential", float("nan"))
        lines.append(f"{name:<14}{row['variant']:<12}{row['sequential']:>11.4f}"
                     f"{row['arbitrary_mean']:>10.4f}{row['arbitrary_min']:>9.4f}{ratio:>9.3f}")
    for name, m in merge_table.items():
        lines.append(f"merge {name}: test {m['test_merged_mean']:.4f} vs sources' mean "
                     f"{m.get('test_sources_mean', float('nan')):.4f}; validation "
                     f"{m['val_merged']:.4f} vs best source {m['val_best_source']:.4f}")
    return "\n".join(lines)
