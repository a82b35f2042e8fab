"""Stage `report`: the summary tables of every evaluated model.

Writes metrics/summary.json (per run: sequential and arbitrary-order accuracy against the
sequential baseline), metrics/robustness_summary.json and metrics/robustness.md (per model and
evaluation mode: clean accuracy, mean corruption accuracy, mCE relative to the sequential
baseline, FGSM/PGD accuracy per budget, nullspace invariance), and the plots
plots/robustness/{severity,adversarial}.{csv,png} (accuracy vs severity per corruption family;
accuracy vs eps), all mirrored to MLflow.
"""
import json

from _stage import METRICS, PLOTS, begin, track

from anyorder.files import atomic_write_bytes, atomic_write_csv, atomic_write_json
from anyorder.summary import robustness_markdown, robustness_table, summary_table

COLUMNS = ["clean", "mean_corruption_accuracy", "mce_vs_baseline", "fgsm@1/255", "fgsm@4/255",
           "fgsm@8/255", "pgd@1/255", "pgd@4/255", "pgd@8/255", "synthesised_noise_accuracy",
           "exact_nullspace_max_relative_logit_change"]


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


def png(figure) -> bytes:
    import io
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return buffer.getvalue()


def _figure(rows: list[dict], panel: str, x: str, xlabel: str, width: float, title=str.upper
            ) -> bytes:
    """One panel per value of `panel`, one line per (model, mode): accuracy against `x`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    data = png(fig)
    plt.close(fig)
    return data


def draw(severity: list[dict], adversarial: list[dict]) -> dict[str, bytes]:
    return {"severity": _figure(severity, "family", "severity", "severity", 4, title=str),
            "adversarial": _figure(adversarial, "attack", "eps_255", "eps (x 1/255)", 5)}


def main() -> None:
    stage = begin(__doc__, "report")
    names = list(stage.settings.finetune.runs) + list(stage.settings.nullspace.arms)
    runs = {name: json.loads((METRICS / "evaluate" / f"{name}.json").read_text())
            for name in stage.settings.finetune.runs}
    robust = {name: json.loads((METRICS / "robustness" / f"{name}.json").read_text())
              for name in names}
    with track(stage) as mlflow:
        summary = summary_table(runs)
        atomic_write_json(METRICS / "summary.json", summary)
        for name, row in summary["runs"].items():
            mlflow.log_metrics({f"{name}.sequential": row["sequential"],
                                f"{name}.arbitrary_mean": row["arbitrary_mean"]})
        mlflow.log_artifact(str(METRICS / "summary.json"))
        table = robustness_table(robust, summary["baseline_run"] or names[0])
        atomic_write_json(METRICS / "robustness_summary.json", table)
        atomic_write_bytes(METRICS / "robustness.md", robustness_markdown(table, COLUMNS).encode())
        severity, adversarial = plot_rows(robust)
        atomic_write_csv(PLOTS / "robustness" / "severity.csv", severity)
        atomic_write_csv(PLOTS / "robustness" / "adversarial.csv", adversarial)
        for plot_name, data in draw(severity, adversarial).items():
            atomic_write_bytes(PLOTS / "robustness" / f"{plot_name}.png", data)
            mlflow.log_artifact(str(PLOTS / "robustness" / f"{plot_name}.png"))
        mlflow.log_artifact(str(METRICS / "robustness.md"))
    print(f"{'run':<14}{'variant':<12}{'sequential':>11}{'arb mean':>10}{'arb min':>9}{'vs base':>9}")
    for name, row in summary["runs"].items():
        ratio = row.get("arbitrary_mean_vs_baseline_sequential", float("nan"))
        print(f"{name:<14}{row['variant']:<12}{row['sequential']:>11.4f}"
              f"{row['arbitrary_mean']:>10.4f}{row['arbitrary_min']:>9.4f}{ratio:>9.3f}")
    print((METRICS / "robustness.md").read_text())


if __name__ == "__main__":
    main()
