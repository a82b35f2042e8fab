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
from _plots import png, pyplot
from _stage import METRICS, PLOTS, begin, read_json, track

from anyorder.files import atomic_write_bytes, atomic_write_csv, atomic_write_json
from anyorder.evaluation.intervals import unpack_tree
from anyorder.report import (differences_markdown, merge_summary, pruning_rows, report_markdown,
                              robustness_markdown, robustness_table, summary_table,
                              synthesis_markdown)

COLUMNS = ["fine_tune_epochs", "clean", "mean_corruption_accuracy", "mce_vs_baseline",
           "fgsm@1/255", "fgsm@4/255", "fgsm@8/255", "pgd@1/255", "pgd@4/255", "pgd@8/255",
           "synthesised_noise_accuracy", "synthesis_converged",
           "exact_nullspace_max_relative_logit_change"]
DIFFERENCES_INTRO = """
Against the baseline `{baseline}` in sequential order, with 95% bootstrap intervals over the test
images (paired: both models on the same resampled images; the corruptions are a fixed set). mCE:
the mean over corruptions of the model's errors summed over severities divided by the baseline's;
where the baseline made no error on a corruption, its error counts as one image, so no corruption
is dropped. An interval that holds 0 (1 for mCE) is no evidence of a difference.

"""


SYNTHESIS_INTRO = """
The noise each nullspace fine-tuning epoch trained on: optimiser steps, the mean squared distance
of the softmax outputs it causes on the check set (converged: under nullspace.synthesis.epsilon),
the same distance for random noise of the same norm (what the `random` control trains on), its
norm, how far it moved from its uniform start and how far it lies from that random noise
(relative L2 distances).

"""



def plot_rows(models: dict) -> tuple[list[dict], list[dict]]:
    severity, adversarial = [], []
    for name, m in models.items():
        for mode in m["modes"]:
            per, family_of = m["corruptions"]["per_corruption"], m["corruptions"]["family_of"]
            for family in sorted(set(family_of.values())):
                for s in next(iter(per.values())):
                    values = [per[c][s][mode] for c in per if family_of[c] == family]
                    severity.append({"model": name, "mode": mode, "family": family,
                                     "severity": int(s), "accuracy": sum(values) / len(values)})
            for attack, by_eps in m["adversarial"]["accuracy"].items():
                for eps_value, (eps, by_mode) in zip(m["adversarial"]["eps"], by_eps.items()):
                    adversarial.append({"model": name, "mode": mode, "attack": attack,
                                        "eps": eps_value, "eps_255": round(eps_value * 255, 3),
                                        "accuracy": by_mode[mode]})
    return severity, adversarial


def _figure(rows: list[dict], panel: str, x: str, xlabel: str, width: float, title=str.upper
            ) -> bytes:
    """One panel per value of `panel`, one line per (model, mode): accuracy against `x`."""
    plt = pyplot()
    panels = sorted({r[panel] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), sharey=True,
                             squeeze=False)
    for ax, value in zip(axes[0], panels):
        for model, mode in sorted({(r["model"], r["mode"]) for r in rows}):
            line = [r for r in rows if (r[panel], r["model"], r["mode"]) == (value, model, mode)]
            ax.plot([r[x] for r in line], [r["accuracy"] for r in line], marker="o",
                    linestyle="-" if mode == "sequential" else "--", label=f"{model} ({mode})")
        ax.set(title=title(value), xlabel=xlabel)
    axes[0][0].set_ylabel("test accuracy")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.25, 1, 1))
    return png(fig)


def draw(severity: list[dict], adversarial: list[dict]) -> dict[str, bytes]:
    return {"severity": _figure(severity, "family", "severity", "severity", 4, title=str),
            "adversarial": _figure(adversarial, "attack", "eps_255", "eps (x 1/255)", 5)}


KIND_STYLE = {"sequential": ("black", "-"), "layerdrop": ("tab:red", "-"),
              "shallow": ("tab:gray", ":"), "layershuffle": (None, "-"), "merged": (None, "--")}


def draw_pruning(rows: list[dict]) -> bytes:
    """Accuracy against blocks run, every model on one axis (band: +-1 std over subsets)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # Colours of their own for the baselines (KIND_STYLE); the cycle without them for the rest.
    ax.set_prop_cycle(color=[c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]
                             if c not in ("#d62728", "#7f7f7f")])
    # By kind, then name: a set's order changes with Python's string hashing from run to run,
    # and with it the colours, so the PNG would differ for the same curves.
    kinds = {r["model"]: r["kind"] for r in rows}
    for model in sorted(kinds, key=lambda m: (kinds[m], m)):
        line = sorted((r for r in rows if r["model"] == model), key=lambda r: r["blocks_run"])
        kind = line[0]["kind"]
        color, style = KIND_STYLE[kind]
        x = [r["blocks_run"] for r in line]
        y = [r["accuracy"] for r in line]
        drawn = ax.plot(x, y, linestyle=style, marker="o", markersize=3, color=color,
                        label=f"{model} ({kind})")
        ax.fill_between(x, [a - r["std"] for a, r in zip(y, line)],
                        [a + r["std"] for a, r in zip(y, line)], alpha=0.12,
                        color=drawn[0].get_color())
        if kind == "shallow":  # the model as trained: a point at its own depth
            ax.plot(x[-1:], y[-1:], marker="s", markersize=8, color="tab:gray")
    ax.set(xlabel="blocks run (of the full model's; shallow: trained at that depth)",
           ylabel="test accuracy", title="Test-time layer pruning")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def draw_orders(runs: dict) -> bytes:
    """Test accuracy of every model over the evaluate stage's random orders (one dot each)."""
    plt = pyplot()
    names = list(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(names)), 3.8))
    for i, name in enumerate(names):
        values = runs[name]["order_accuracies"]
        ax.scatter([i] * len(values), values, s=6, alpha=0.5)
        ax.scatter([i], [runs[name]["sequential"]], marker="_", s=300, color="black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="test accuracy", title="Random orders (dots) and sequential order (bar)")
    fig.tight_layout()
    return png(fig)


def kind_of(name: str, runs, merges) -> str:
    if name in merges:
        return "merged"
    run = runs[name]
    if run.depth is not None:
        return "shallow"
    if run.layerdrop_rate:
        return "layerdrop"
    return "sequential" if run.variant == "sequential" else "layershuffle"


def read_metrics(names: list[str], evaluated: list[str], merges) -> dict:
    """The stage's inputs: evaluate, robustness, pruning and merge metrics, the analysis and the
    per-image outcomes of every model."""
    return {
        "runs": {name: read_json(METRICS / "evaluate" / f"{name}.json", f"evaluate@{name}")
                 for name in evaluated},
        "robust": {name: read_json(METRICS / "robustness" / f"{name}.json", name)
                   for name in names},
        "curves": {name: read_json(METRICS / "pruning" / f"{name}.json", name)
                   for name in evaluated},
        "cards": {name: read_json(METRICS / "merge" / f"{name}.json", f"merge@{name}")
                  for name in merges},
        "analysis": read_json(METRICS / "analysis.json", "analysis"),
        "outcomes": {name: unpack_tree(read_json(METRICS / "outcomes" / f"{name}.json", name))
                     for name in dict.fromkeys(names + evaluated)}}


def write_summary(mlflow, runs: dict, baseline: str, outcomes: dict) -> dict:
    """metrics/summary.json, with every run's sequential and random-order mean logged."""
    summary = summary_table(runs, baseline, outcomes)
    atomic_write_json(METRICS / "summary.json", summary)
    for name, row in summary["runs"].items():
        mlflow.log_metrics({f"{name}.sequential": row["sequential"],
                            f"{name}.arbitrary_mean": row["arbitrary_mean"]})
    mlflow.log_artifact(str(METRICS / "summary.json"))
    return summary


def write_robustness(robust: dict, baseline: str, outcomes: dict) -> str:
    """metrics/robustness_summary.json and metrics/robustness.md; returns the latter's text."""
    table = robustness_table(robust, baseline, {n: o["robustness"] for n, o in
                                                 outcomes.items() if "robustness" in o})
    atomic_write_json(METRICS / "robustness_summary.json", table)
    robustness_md = (robustness_markdown(table, COLUMNS) + DIFFERENCES_INTRO.format(
        baseline=baseline) + differences_markdown(table))
    trained_noise = synthesis_markdown(robust)
    if trained_noise:
        robustness_md += SYNTHESIS_INTRO + trained_noise
    atomic_write_bytes(METRICS / "robustness.md", robustness_md.encode())
    return robustness_md


def write_images(mlflow, severity: list[dict], adversarial: list[dict], pruning: list[dict],
                 runs: dict) -> dict[str, str]:
    """The robustness, pruning and orders PNGs; returns every figure's name -> its path as the
    report page links it (the analysis stage's PNGs included)."""
    images = {PLOTS / "robustness" / f"{n}.png": data
              for n, data in draw(severity, adversarial).items()}
    images[PLOTS / "pruning" / "pruning.png"] = draw_pruning(pruning)
    images[PLOTS / "orders.png"] = draw_orders(runs)
    for path, data in images.items():
        atomic_write_bytes(path, data)
        mlflow.log_artifact(str(path))
    figures = {path.stem: f"../{path.as_posix()}" for path in images}
    figures.update({path.stem: f"../{path.as_posix()}"
                    for path in sorted((PLOTS / "analysis").glob("*.png"))})
    return figures


def print_summary(summary: dict, merge_table: dict) -> None:
    print(f"{'run':<14}{'variant':<12}{'sequential':>11}{'arb mean':>10}{'arb min':>9}{'vs base':>9}")
    for name, row in summary["runs"].items():
        ratio = row.get("arbitrary_mean_vs_baseline_sequential", float("nan"))
        print(f"{name:<14}{row['variant']:<12}{row['sequential']:>11.4f}"
              f"{row['arbitrary_mean']:>10.4f}{row['arbitrary_min']:>9.4f}{ratio:>9.3f}")
    for name, m in merge_table.items():
        print(f"merge {name}: test {m['test_merged_mean']:.4f} vs sources' mean "
              f"{m.get('test_sources_mean', float('nan')):.4f}; validation {m['val_merged']:.4f} "
              f"vs best source {m['val_best_source']:.4f}")
    print(f"report: {METRICS / 'report.md'}")


def main() -> None:
    stage = begin(__doc__, "report")
    finetune_runs, merges = stage.settings.finetune.runs, stage.settings.merge.models
    names = list(finetune_runs) + list(stage.settings.nullspace.arms)
    evaluated = list(finetune_runs) + list(merges)
    inputs = read_metrics(names, evaluated, merges)
    runs, robust, outcomes = inputs["runs"], inputs["robust"], inputs["outcomes"]
    baseline = stage.settings.report.baseline
    with track(stage) as mlflow:
        summary = write_summary(mlflow, runs, baseline, outcomes)
        robustness_md = write_robustness(robust, baseline, outcomes)
        severity, adversarial = plot_rows(robust)
        atomic_write_csv(PLOTS / "robustness" / "severity.csv", severity)
        atomic_write_csv(PLOTS / "robustness" / "adversarial.csv", adversarial)
        curves = inputs["curves"]
        pruning = pruning_rows(curves, {n: kind_of(n, finetune_runs, merges) for n in curves})
        atomic_write_csv(PLOTS / "pruning" / "curves.csv", pruning)
        merge_table = merge_summary(inputs["cards"], runs, outcomes)
        atomic_write_json(METRICS / "merge_summary.json", merge_table)
        figures = write_images(mlflow, severity, adversarial, pruning, runs)
        page = report_markdown(summary, pruning, merge_table, inputs["analysis"], robustness_md,
                               figures)
        atomic_write_bytes(METRICS / "report.md", page.encode())
        mlflow.log_artifact(str(METRICS / "robustness.md"))
        mlflow.log_artifact(str(METRICS / "report.md"))
    print_summary(summary, merge_table)


if __name__ == "__main__":
    main()
