"""A merge as the merge stage runs it, on anyorder.model.merge: the sources a merge entry names
(each checked and loaded), the recipe (random and manual ones made, and checked against the
models, before any scoring), the merged model and its card, written as an ordinary checkpoint
beside `recipe.yaml` and `merge.json` (the card: recipe, sources and the sha256 of their
weights, seed, validation figures, the greedy rule's every step)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from anyorder.config import FINETUNED
from anyorder.files import atomic_directory, atomic_write_json, sha256_file
from anyorder.model.checkpoint import WEIGHTS, load_model, save_model, training_record
from anyorder.model.merge import (GENERATORS, MergeContext, MergeError, MergeResult, Recipe,
                                  Scorer, check_compatible, merge_models, slot_table_sources)
from anyorder.model.vit import AnyOrderViT


def load_sources(name: str, entry, allowed: list[Path]) -> tuple[dict[str, str], dict]:
    """The sources of merge.models.<name>: name -> model directory (runs of finetune.runs, or a
    manual entry's recipe's directories, each inside one of `allowed`: the directories the merge
    stage declares in dvc.yaml, else DVC would not rerun the merge when a source changes), and
    their models, which must be able to exchange blocks. MergeError naming the setting
    otherwise."""
    where = f"merge.models.{name}"
    if entry.generator == "manual":
        sources = Recipe.load(entry.recipe).sources
        where = f"{entry.recipe} (merge.models.{name}.recipe)"
    else:
        sources = {run: str(FINETUNED / run) for run in entry.sources}
    for source, path in sources.items():
        if not any(Path(path) == d or d in Path(path).parents for d in allowed):
            raise MergeError(
                f"{where}: source {source} = {path} is outside the directories the merge stage "
                f"declares in dvc.yaml ({', '.join(map(str, allowed[:2]))}); add it to the "
                f"stage's deps, or DVC will not rerun the merge when it changes")
        if not (Path(path) / "model.json").is_file():
            raise MergeError(f"{where}: source {source} = {path} holds no model (model.json); "
                             f"name a model directory the pipeline writes, e.g. "
                             f"models/finetune/ls_s0")
    models = {source: load_model(path) for source, path in sources.items()}
    check_compatible({source: model.spec for source, model in models.items()})
    return sources, models


def plan_merge(entry, sources: dict[str, str], models: dict, scorer: Scorer
               ) -> tuple[MergeContext, Optional[MergeResult]]:
    """The generator's context, and the recipe of a generator that scores nothing (random,
    manual), already checked against the models; None for greedy, which scores as it goes."""
    context = MergeContext(sources, models, entry.base,
                           entry.seed, scorer, entry.recipe)
    early = None if entry.generator == "greedy" else GENERATORS[entry.generator](context)
    if early is not None:
        merge_models(early.recipe, models)
    return context, early


def merge_with_card(name: str, entry, context: MergeContext, early: Optional[MergeResult]
                    ) -> tuple[MergeResult, AnyOrderViT, dict]:
    """The recipe (`early`, or the generator's now), the merged model and its card."""
    result = early or GENERATORS[entry.generator](context)
    merged = merge_models(result.recipe, context.models)
    scorer = context.scorer
    source_scores = result.source_scores or {s: scorer(m) for s, m in context.models.items()}
    merged_score = scorer(merged)
    card = {"name": name, "generator": entry.generator, "seed": entry.seed,
            "recipe": result.recipe.to_dict(),
            "slot_tables": slot_table_sources(result.recipe, merged),
            "sources": {s: {"path": p, "sha256": sha256_file(Path(p) / WEIGHTS)}
                        for s, p in context.sources.items()},
            "validation": {"split": "val", "mode": scorer.mode(merged),
                           "num_orders": scorer.num_orders, "order_seed": scorer.seed,
                           "sources": source_scores, "merged": merged_score,
                           "best_source": max(source_scores.values()),
                           "sources_mean": sum(source_scores.values()) / len(source_scores)},
            "history": result.history}
    return result, merged, card


def save_merged(out_dir: str | Path, merged: AnyOrderViT, recipe: Recipe, card: dict) -> None:
    """The merged checkpoint (its training record: seed, generator, sources), `recipe.yaml`
    and `merge.json` (the card), swapped into `out_dir` whole."""
    with atomic_directory(out_dir) as out:
        save_model(merged, out, {"training": {"seed": card["seed"], "merge": {
            "generator": card["generator"], "sources": list(card["sources"])}}})
        recipe.save(out / "recipe.yaml")
        atomic_write_json(out / "merge.json", card)


def merge_extra(sources: dict[str, str]) -> dict:
    """What a merged model's evaluation records of it: its sources and their fine-tune epochs
    ("4", or "4/8" when they differ)."""
    return {"merged_from": list(sources), "fine_tune_epochs": "/".join(sorted({
        str(training_record(p)["config"]["epochs"]) for p in sources.values()}))}


def with_test(card: dict, evaluation: dict, pruning: dict) -> dict:
    """The card with the merged model's test figures (metrics/merge/<name>.json)."""
    card["test"] = {"sequential": evaluation["sequential"], "arbitrary": evaluation["arbitrary"],
                    "pruning_curve": pruning["curve"]}
    return card
