"""Stage `analysis`: how blocks behave depending on the slot they run at (the paper's analysis).

For every model of analysis.models: the accuracy drop when the block at slot s is skipped, per
slot (random orders for LayerShuffle models, the sequential order otherwise), and a 2-D
projection (analysis.projection: pca, or umap when umap-learn is installed) of one block's output
run at every slot, coloured by slot; for LS-pred models, the confusion matrix of predicted vs
actual slot. Writes metrics/analysis.json and plots/analysis/ (CSV + PNG), mirrored to MLflow.
"""
from pathlib import Path

import numpy as np

from _plots import png, pyplot
from _stage import METRICS, PLOTS, PREPARED, begin, declared, fail, track, user_errors

from anyorder.evaluation.analysis import (block_outputs_by_slot, project, slot_confusion, slot_contribution,
                               slot_separation)
from anyorder.model.checkpoint import load_model
from anyorder.data.prepared import load_split
from anyorder.files import atomic_write_bytes, atomic_write_csv, atomic_write_json
from anyorder.device import resolve_device

OUT = PLOTS / "analysis"


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


def load_inputs(stage, cfg):
    """Checks the settings (exit 2 on bad input) and loads the models and the test split;
    returns (device, models by directory name, images, labels)."""
    with user_errors():
        device = resolve_device(cfg.device, "analysis.device")
        if not cfg.models:
            fail("analysis.models: list at least one model directory, e.g. models/finetune/ls_s0")
        deps = [Path(d) for d in declared(stage.name, "deps", stage.raw_params)]
        for path in cfg.models:
            if not any(d in Path(path).parents for d in deps):
                fail(f"analysis.models: {path} is outside the directories the analysis stage "
                     f"declares in dvc.yaml; add it to the stage's deps")
        models = {Path(path).name: load_model(path) for path in cfg.models}
        for name, model in models.items():
            if cfg.block >= model.depth:
                fail(f"analysis.block: {cfg.block} is outside model {name} ({model.depth} blocks)")
        if cfg.projection == "umap":
            import importlib.util
            if importlib.util.find_spec("umap") is None:
                fail("analysis.projection: umap needs umap-learn (pip install umap-learn), or "
                     "set it to pca")
        images, labels = load_split(PREPARED, "test")
    return device, models, images, labels


def analyse(models: dict, images, labels, subset, cfg, device):
    """Per model: slot contribution, the projection of block cfg.block's output at every slot
    and, for LS-pred models, the slot confusion; returns (results, projections, CSV rows,
    confusions)."""
    results, projections, rows, confusions = {}, {}, [], {}
    for name, model in models.items():
        contribution = slot_contribution(model, images, labels, cfg.num_orders, cfg.seed,
                                         cfg.batch_size, device)
        features, slots = block_outputs_by_slot(model, images[np.sort(subset)], cfg.block,
                                                cfg.seed, cfg.batch_size, device)
        points = project(features, cfg.projection, cfg.seed)
        separation = slot_separation(points, slots)
        projections[name] = (points, slots, separation)
        results[name] = {"variant": model.variant, "slot_contribution": contribution,
                         "projection": {"block": cfg.block, "method": cfg.projection,
                                        "num_images": int(len(subset)),
                                        "slot_separation": separation}}
        if model.variant == "ls_pred":
            confusions[name] = slot_confusion(model, images, cfg.num_orders, cfg.seed,
                                              cfg.batch_size, device)
            results[name]["slot_confusion"] = confusions[name]
        rows += [{"model": name, "slot": s, "accuracy_drop": d}
                 for s, d in enumerate(contribution["drop_per_slot"])]
    return results, projections, rows, confusions


def write_outputs(mlflow, results: dict, projections: dict, rows: list[dict], confusions: dict,
                  cfg) -> None:
    """metrics/analysis.json and plots/analysis/ (the CSV and the PNGs), mirrored to MLflow."""
    atomic_write_json(METRICS / "analysis.json", {"models": results})
    for old in OUT.glob("*.png") if OUT.is_dir() else []:  # no figure of a model now gone
        old.unlink()
    atomic_write_csv(OUT / "slot_contribution.csv", rows)
    figures = {"slot_contribution": draw_contribution(results),
               "projection": draw_projections(projections, cfg.block, cfg.projection)}
    for name, confusion in confusions.items():
        figures[f"slot_confusion-{name}"] = draw_confusion(name, confusion)
    for figure, data in figures.items():
        atomic_write_bytes(OUT / f"{figure}.png", data)
        mlflow.log_artifact(str(OUT / f"{figure}.png"))
    mlflow.log_artifact(str(METRICS / "analysis.json"))
    for name, r in results.items():
        mlflow.log_metric(f"{name}.slot_separation", r["projection"]["slot_separation"])


def main() -> None:
    stage = begin(__doc__, "analysis")
    cfg = stage.settings.analysis
    device, models, images, labels = load_inputs(stage, cfg)
    subset = np.random.default_rng(cfg.seed).permutation(len(labels))[:cfg.num_images]
    with track(stage) as mlflow:
        results, projections, rows, confusions = analyse(models, images, labels, subset, cfg,
                                                         device)
        write_outputs(mlflow, results, projections, rows, confusions, cfg)
    for name, r in results.items():
        drops = ", ".join(f"{100 * d:.1f}" for d in r["slot_contribution"]["drop_per_slot"])
        print(f"analysis: {name}: points lost per skipped slot [{drops}]; slot separation of "
              f"block {cfg.block}'s output {r['projection']['slot_separation']:.2f}")


if __name__ == "__main__":
    main()
