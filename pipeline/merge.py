"""Stage `merge@<name>`: a Frankenstein model assembled block by block from several fine-tuned
models that share a start (merge.models.<name>: a recipe generator, random | greedy | manual, its
sources and seed; see anyorder.model.merge).

Writes models/merged/<name>/: the merged checkpoint (an ordinary one: it evaluates, exports and
registers like any other), `recipe.yaml` (the recipe, usable as a manual one) and `merge.json`
(the card: recipe, sources and the sha256 of their weights, seed, validation figures, the greedy
rule's every step). Then evaluates it like evaluate@<run> does (metrics/evaluate/<name>.json,
metrics/pruning/<name>.json) and writes the card with its test figures to metrics/merge/<name>.json.
"""
import json
from pathlib import Path

from _evaluation import evaluate_and_prune
from _stage import MERGED, METRICS, PREPARED, begin, declared, fail, track, user_errors

from anyorder.model.checkpoint import SPEC, WEIGHTS, load_model, save_model
from anyorder.data.prepared import load_split
from anyorder.files import atomic_directory, atomic_write_json, sha256_file
from anyorder.evaluation.intervals import pack_tree
from anyorder.model.merge import (GENERATORS, MergeContext, Recipe, Scorer, check_compatible,
                            merge_models, slot_table_sources)
from anyorder.device import resolve_device


def sources_of(stage, name: str, entry) -> dict[str, str]:
    """name -> model directory of every source, each inside a directory the stage declares as a
    dependency (else DVC would not rerun the merge when the source changes)."""
    where = f"merge.models.{name}"
    if entry.generator == "manual":
        sources = Recipe.load(entry.recipe).sources
        where = f"{entry.recipe} (merge.models.{name}.recipe)"
    else:
        sources = {Path(path).name: path for path in entry.sources}
    deps = [Path(d) for d in declared(stage.name, "deps", stage.raw_params)]
    for source, path in sources.items():
        inside = any(Path(path) == d or d in Path(path).parents for d in deps)
        if not inside:
            fail(f"{where}: source {source} = {path} is outside the directories the merge stage "
                 f"declares in dvc.yaml ({', '.join(map(str, deps[:2]))}); add it to the stage's "
                 f"deps, or DVC will not rerun the merge when it changes")
        if not (Path(path) / "model.json").is_file():
            fail(f"{where}: source {source} = {path} holds no model (model.json); name a model "
                 f"directory the pipeline writes, e.g. models/finetune/ls_s0")
    return sources


def main() -> None:
    stage = begin(__doc__, "merge", foreach="name")
    name, cfg = stage.args.name, stage.settings.merge
    entry = cfg.models[name]
    with user_errors():
        device = resolve_device(cfg.device, "merge.device")
        evaluate_device = resolve_device(stage.settings.evaluate.device, "evaluate.device")
        pruning_device = resolve_device(stage.settings.pruning.device, "pruning.device")
        sources = sources_of(stage, name, entry)
        models = {source: load_model(path) for source, path in sources.items()}
        check_compatible({source: model.spec for source, model in models.items()})
        val_images, val_labels = load_split(PREPARED, "val")
        test = load_split(PREPARED, "test")
    scorer = Scorer(val_images, val_labels, cfg.num_orders, cfg.order_seed, cfg.batch_size, device)
    context = MergeContext(sources, models, Path(entry.base).name if entry.base else None,
                           entry.seed, scorer, entry.recipe)
    with user_errors():  # recipes that need no scoring (random, manual) are checked before compute
        early = None if entry.generator == "greedy" else GENERATORS[entry.generator](context)
        if early is not None:
            merge_models(early.recipe, models)
    with track(stage) as mlflow:
        result = early or GENERATORS[entry.generator](context)
        merged = merge_models(result.recipe, models)
        source_scores = result.source_scores or {s: scorer(m) for s, m in models.items()}
        merged_score = scorer(merged)
        card = {"name": name, "generator": entry.generator, "seed": entry.seed,
                "recipe": result.recipe.to_dict(),
                "slot_tables": slot_table_sources(result.recipe, merged),
                "sources": {s: {"path": p, "sha256": sha256_file(Path(p) / WEIGHTS)}
                            for s, p in sources.items()},
                "validation": {"split": "val", "mode": scorer.mode(merged),
                               "num_orders": cfg.num_orders, "order_seed": cfg.order_seed,
                               "sources": source_scores, "merged": merged_score,
                               "best_source": max(source_scores.values()),
                               "sources_mean": sum(source_scores.values()) / len(source_scores)},
                "history": result.history}
        with atomic_directory(MERGED / name) as out:
            save_model(merged, out, {"training": {"seed": entry.seed, "merge": {
                "generator": entry.generator, "sources": list(sources)}}})
            result.recipe.save(out / "recipe.yaml")
            atomic_write_json(out / "merge.json", card)
        evaluation, pruning, outcomes = evaluate_and_prune(
            stage.settings, merged, name, entry.seed, test, evaluate_device, pruning_device,
            mlflow, extra={"merged_from": list(sources), "fine_tune_epochs": "/".join(sorted({
                str(json.loads((Path(p) / SPEC).read_text())["training"]["config"]["epochs"])
                for p in sources.values()}))})
        atomic_write_json(METRICS / "outcomes" / f"{name}.json", pack_tree({"orders": outcomes}))
        card["test"] = {"sequential": evaluation["sequential"], "arbitrary": evaluation["arbitrary"],
                        "pruning_curve": pruning["curve"]}
        atomic_write_json(METRICS / "merge" / f"{name}.json", card)
        mlflow.log_metrics({"val_merged": merged_score,
                            "val_best_source": card["validation"]["best_source"],
                            "val_sources_mean": card["validation"]["sources_mean"]})
        mlflow.log_dict(card, "merge.json")
        mlflow.log_artifacts(str(MERGED / name), artifact_path="model")
    slots = " ".join(f"{s}:{b}" for s, b in result.recipe.slots)
    print(f"{stage.name}: {entry.generator} recipe [{slots}]; validation {merged_score:.4f} "
          f"(sources {', '.join(f'{s} {v:.4f}' for s, v in source_scores.items())}); test "
          f"{evaluation['arbitrary']['mean']:.4f} over {evaluation['arbitrary']['count']} orders")


if __name__ == "__main__":
    main()
