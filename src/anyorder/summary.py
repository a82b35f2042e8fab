"""The pipeline's summary table of evaluated runs (plain Python: no torch needed to read results)."""
from __future__ import annotations

from typing import Optional


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
               "num_orders": m["arbitrary"]["count"], "depth": m.get("depth")}
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


# -- pruning, merging and the report page ---------------------------------------------------------

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


def merge_summary(cards: dict[str, dict], runs: dict[str, dict]) -> dict:
    """Per merged model: validation (merged, best source, sources' mean) and test (merged mean
    over the evaluate stage's orders vs the mean of its sources' means over the same orders,
    where those sources were evaluated by evaluate@<run>)."""
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
        out[name] = row
    return out


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_number(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def report_markdown(summary: dict, pruning: list[dict], merges: dict, analysis: Optional[dict],
                    robustness_md: str, figures: dict[str, str]) -> str:
    """The pipeline's report page: every model's headline numbers and the plots, as Markdown
    with the PNGs beside it (`figures`: name -> path relative to the page)."""
    quarter = {}
    for model in {r["model"] for r in pruning}:
        depth = max(r["blocks_run"] for r in pruning if r["model"] == model)
        quarter[model] = kept_at(pruning, model, depth - depth // 4)
    parts = ["# anyorder pipeline report\n",
             "Written by the `report` stage from the metrics of this run (test split unless a "
             "column says otherwise). Random orders: the evaluate stage's seeded orders. "
             "Pruned by 1/4: mean accuracy with a quarter of the blocks removed (random subsets; "
             "random orders for LayerShuffle models), as a fraction of the unpruned mean.\n",
             "## Models\n",
             _table(["model", "variant", "blocks", "sequential", "random orders: mean", "worst",
                     "pruned by 1/4 keeps"],
                    [[name, row["variant"], str(row.get("depth", "")), row["sequential"],
                      row["arbitrary_mean"], row["arbitrary_min"], quarter.get(name)]
                     for name, row in summary["runs"].items()])]
    if "orders" in figures:
        parts += ["\n## Accuracy per order\n", f"![accuracy per order]({figures['orders']})\n"]
    parts += ["\n## Pruning\n", "Accuracy against the number of blocks run: LayerShuffle models "
              "keep the kept blocks in a random order, the sequential baseline and LayerDrop in "
              "sequential order; shallow models are trained at their depth.\n"]
    if "pruning" in figures:
        parts.append(f"![pruning]({figures['pruning']})\n")
    if merges:
        parts += ["\n## Frankenstein merges\n",
                  _table(["merged", "generator", "val: merged", "val: best source",
                          "test: merged mean", "test: sources' mean", "difference (points)",
                          "recipe (slot: source:block)"],
                         [[name, m["generator"], m["val_merged"], m["val_best_source"],
                           m["test_merged_mean"], m.get("test_sources_mean"),
                           m.get("test_merged_minus_sources_points"), " ".join(m["slots"])]
                          for name, m in merges.items()])]
    parts += ["\n## Robustness\n", robustness_md]
    for name in ("severity", "adversarial"):
        if name in figures:
            parts.append(f"\n![{name}]({figures[name]})\n")
    if analysis:
        parts += ["\n## Analysis: blocks and the slot they run at\n",
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
    return "\n".join(parts)
