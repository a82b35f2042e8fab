"""What stages write and log beyond a line or two: a training run (relaunched under torchrun when
asked for several processes, its epochs mirrored to MLflow, the plot CSV, the model logged), a
model's evaluation and pruning curve, its robustness, one output file of any kind (`write`), and
the figures of analysis and report (headless matplotlib, PNG bytes that depend only on the data).

Nothing here computes or imports the library's compute: a stage calls the library and hands its
results here (a training stage hands over the library's training function), so each stage
depends on exactly the library code it calls, and `dvc repro` reruns it only when that changes.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.stage import (METRICS, PLOTS, PREPARED, STAGE_ARGV, Stage, fail, inputs_digest,
                            project_root, track)

from anyorder.errors import RunFailed
from anyorder.files import atomic_write_bytes, atomic_write_csv, atomic_write_json
from anyorder.threads import cores_per_process

# Resumable training state: outside DVC's outputs (DVC deletes those before a stage runs), and
# at the real project root so that it survives `dvc exp run --temp` and the experiment queue.
STATE = project_root() / ".anyorder" / "state"


def write(path: Path, data):
    """One output file, atomically: rows as CSV (a .csv path), text as UTF-8, bytes as they are,
    anything else as JSON. Returns `data`."""
    if Path(path).suffix == ".csv":
        atomic_write_csv(path, data)
    elif isinstance(data, (str, bytes)):
        atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)
    else:
        atomic_write_json(path, data)
    return data


# -- training --------------------------------------------------------------------------------------

def _torchrun() -> tuple[int, int]:
    """(rank, world size) of this process in a torchrun launch ((0, 1) outside one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ["RANK"]) if world > 1 else 0), world


def relaunch_under_torchrun(nproc: int) -> None:
    """With `nproc` > 1 and not yet under torchrun: become torchrun running this same stage
    command in `nproc` processes (DDP, one machine; rank 0 does what this process would have).
    Each process gets an equal share of the cores."""
    if nproc <= 1 or _torchrun()[1] > 1:
        return
    # Set here, or torchrun sets 1; compute.threads 0 then takes it (compute.threads_for).
    os.environ.setdefault("OMP_NUM_THREADS", str(cores_per_process(nproc)))
    # The stage's own arguments travel in the environment: torchrun would read `--run` after
    # the script name as an abbreviation of its own `--run-path`.
    os.environ[STAGE_ARGV] = json.dumps(sys.argv[1:])
    stage_module = sys.modules["__main__"].__spec__.name  # python -m pipeline.stages.<stage>
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "--module", stage_module]
    print(f"launching {nproc} processes: {' '.join(command[1:])}", flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, command)


class _NoTracking:
    """What a rank other than 0 logs to MLflow: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def train_and_log(stage: Stage, train: Callable, model, cfg, seed: int, out_dir: Path,
                  plot_csv: Path, order_sampling: str = "batch", position_loss_weight: float = 1.0,
                  epoch_noise=None, info: Optional[dict] = None, fingerprint_extra: str = "",
                  then: Optional[Callable] = None, layerdrop: Optional[list] = None) -> None:
    """Train and save with the library's `train` (anyorder.training.loop.train_and_save;
    resumable under STATE/<stage>), write the per-epoch plot CSV, mirror it all to MLflow
    (timings there and in the log, never in the outputs).
    `then(mlflow, history)` runs after saving, inside the same MLflow run (an evaluation of the
    model; history: the per-epoch records).
    With cfg.nproc > 1 the stage first relaunches itself under torchrun; only rank 0 logs,
    writes and evaluates."""
    relaunch_under_torchrun(cfg.nproc)
    main = _torchrun()[0] == 0
    with (track(stage) if main else nullcontext(_NoTracking())) as mlflow:
        def log_epoch(epoch: int, record: dict, seconds: float) -> None:
            mlflow.log_metrics({**{k: v for k, v in record.items() if k != "epoch"},
                                "epoch_seconds": seconds}, step=epoch)

        try:
            result = train(model, PREPARED, cfg, seed, out_dir, STATE / stage.name,
                           order_sampling=order_sampling,
                           position_loss_weight=position_loss_weight,
                           fingerprint_extra=inputs_digest(stage) + fingerprint_extra,
                           on_epoch_end=log_epoch, epoch_noise=epoch_noise, info=info,
                           layerdrop=layerdrop)
        except RunFailed as exc:
            fail(f"{stage.name}: {exc}", code=1)
        if not main:
            return
        atomic_write_csv(plot_csv, result.history)
        mlflow.log_metrics({"train_seconds": sum(result.epoch_seconds),
                            "resumed_from_epoch": result.resumed_from_epoch})
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
        if then is not None:
            then(mlflow, result.history)
    # Saved: no state of this stage is worth resuming any more, also none left by a run with
    # other settings that was killed.
    shutil.rmtree(STATE / stage.name, ignore_errors=True)
    final = result.history[-1]
    print(f"{stage.name}: val accuracy {final['val_accuracy_sequential']:.4f} sequential, "
          f"{final['val_accuracy_shuffled']:.4f} shuffled -> {out_dir}")


# -- evaluation and robustness ---------------------------------------------------------------------

def write_evaluation(mlflow, metrics: dict, pruning: dict) -> None:
    """A model's order evaluation and pruning curve (anyorder.evaluation.record):
    metrics/evaluate/<name>.json, plots/orders/<name>.csv and metrics/pruning/<name>.json, all
    logged to MLflow."""
    name = metrics["run"]
    atomic_write_json(METRICS / "evaluate" / f"{name}.json", metrics)
    atomic_write_csv(PLOTS / "orders" / f"{name}.csv", [
        {"order_index": i, "accuracy": acc, "order": "-".join(map(str, order))}
        for i, (order, acc) in enumerate(zip(metrics["orders"], metrics["order_accuracies"]))])
    arbitrary = metrics["arbitrary"]
    mlflow.log_metrics({"test_accuracy_sequential": metrics["sequential"],
                        **{f"test_accuracy_arbitrary_{k}": v for k, v in arbitrary.items()
                           if k != "count"}})
    mlflow.log_artifact(str(METRICS / "evaluate" / f"{name}.json"))
    atomic_write_json(METRICS / "pruning" / f"{name}.json", pruning)
    for row in pruning["curve"]:
        mlflow.log_metric("pruning_mean_accuracy", row["mean"], step=row["removed"])
    mlflow.log_artifact(str(METRICS / "pruning" / f"{name}.json"))


def write_robustness(mlflow, metrics: dict) -> None:
    """A model's robustness (anyorder.robustness.record) to metrics/robustness/<name>.json and
    MLflow; what it found, said in the log."""
    name = metrics["model"]
    path = METRICS / "robustness" / f"{name}.json"
    atomic_write_json(path, metrics)
    for mode in metrics["modes"]:
        mlflow.log_metrics({
            f"robust.{mode}.clean": metrics["clean_accuracy"][mode],
            f"robust.{mode}.mean_corruption_accuracy":
                metrics["corruptions"]["mean_corruption_accuracy"][mode],
            **{f"robust.{mode}.{attack}_{eps.replace('/', '_')}": by_mode[mode]
               for attack, table in metrics["adversarial"]["accuracy"].items()
               for eps, by_mode in table.items()}})
    mlflow.log_artifact(str(path))
    exact = metrics["nullspace"]["exact"]
    if "note" in exact:
        print(f"{name}: {exact['note']}")
    else:
        print(f"{name}: exact nullspace of dimension {exact['nullspace']['dimension']}: noise as "
              f"large as each image changes {exact['sequential']['predictions_changed']} "
              f"predictions, relative logit change at most "
              f"{exact['sequential']['relative_logit_change_max']:.2e}")
    synthesis = metrics["nullspace"]["synthesised"]["synthesis"]
    reached = "reached" if synthesis["converged"] else "warning: did NOT reach"
    print(f"{name}: approximate-nullspace noise {reached} epsilon in {synthesis['steps']} "
          f"steps (distance {synthesis['distance']:.4g} on "
          f"{synthesis['check_images']} training images; random noise of its norm "
          f"{synthesis['random_distance']:.3g})")
    adversarial = metrics["adversarial"]
    if adversarial["pgd_above_fgsm"]:
        print(f"warning: {name}: PGD scores above FGSM at {adversarial['pgd_above_fgsm']}: a sign "
              f"of gradient masking or a too-weak PGD (raise robustness.attacks.pgd_steps)")


# -- figures ---------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png(figure) -> bytes:
    import io
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    pyplot().close(figure)
    return buffer.getvalue()


def write_figures(mlflow, figures: dict[Path, bytes]) -> None:
    """PNGs, each logged to MLflow."""
    for path, data in figures.items():
        atomic_write_bytes(path, data)
        mlflow.log_artifact(str(path))


def draw_contribution(results: dict) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, r in results.items():
        drops = 100 * np.asarray(r["slot_contribution"]["drop_per_slot"])
        ax.plot(range(len(drops)), drops, marker="o", label=f"{name} ({r['variant']})")
    ax.set(xlabel="slot skipped", ylabel="accuracy drop (points)",
           title="Per-slot contribution: accuracy lost when the block at slot s is skipped")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def draw_projections(projections: dict, block: int, method: str) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(projections), figsize=(3.3 * len(projections), 3.3),
                             squeeze=False)
    for ax, (name, (points, slots, separation)) in zip(axes[0], projections.items()):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=slots, cmap="viridis", s=3)
        ax.set(title=f"{name}: separation {separation:.2f}", xticks=[], yticks=[])
        ax.title.set_fontsize(8)
    fig.colorbar(scatter, ax=axes[0].tolist(), label="slot block ran at")
    fig.suptitle(f"Output of block {block} run at each slot ({method.upper()})", fontsize=9)
    return png(fig)


def draw_confusion(name: str, confusion: dict) -> bytes:
    plt = pyplot()
    matrix = np.asarray(confusion["matrix"], dtype=float)
    matrix = matrix / matrix.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(4, 3.5))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="predicted slot", ylabel="actual slot",
           title=f"{name}: slot prediction, accuracy {confusion['accuracy']:.2f}")
    ax.title.set_fontsize(9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return png(fig)


def write_analysis_figures(mlflow, out: Path, results: dict, projections: dict,
                           confusions: dict, cfg) -> None:
    """The analysis stage's PNGs under `out` (those of a model now gone removed), logged."""
    for old in out.glob("*.png") if out.is_dir() else []:  # no figure of a model now gone
        old.unlink()
    figures = {"slot_contribution": draw_contribution(results),
               "projection": draw_projections(projections, cfg.block, cfg.projection)}
    for name, confusion in confusions.items():
        figures[f"slot_confusion-{name}"] = draw_confusion(name, confusion)
    write_figures(mlflow, {out / f"{figure}.png": data for figure, data in figures.items()})


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


def write_report_figures(mlflow, severity: list[dict], adversarial: list[dict],
                         pruning: list[dict], runs: dict) -> dict[str, str]:
    """The report's robustness, pruning and orders PNGs, logged; returns every figure's name ->
    its path as the report page links it (the analysis stage's PNGs included)."""
    images = {PLOTS / "robustness" / "severity.png":
              _figure(severity, "family", "severity", "severity", 4, title=str),
              PLOTS / "robustness" / "adversarial.png":
              _figure(adversarial, "attack", "eps_255", "eps (x 1/255)", 5),
              PLOTS / "pruning" / "pruning.png": draw_pruning(pruning),
              PLOTS / "orders.png": draw_orders(runs)}
    write_figures(mlflow, images)
    figures = {path.stem: f"../{path.as_posix()}" for path in images}
    figures.update({path.stem: f"../{path.as_posix()}"
                    for path in sorted((PLOTS / "analysis").glob("*.png"))})
    return figures
