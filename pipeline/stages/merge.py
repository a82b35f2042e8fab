"""Stage `merge@<name>`: a Frankenstein model assembled block by block from several fine-tuned
models that share a start (merge.models.<name>: a recipe generator, random | greedy | manual, its
sources and seed; see anyorder.model.merge).

Writes models/merged/<name>/: the merged checkpoint (an ordinary one: it evaluates, exports and
registers like any other), `recipe.yaml` (the recipe, usable as a manual one) and `merge.json`
(the card: recipe, sources and the sha256 of their weights, seed, validation figures, the greedy
rule's every step). Then evaluates it like evaluate@<run> does (metrics/evaluate/<name>.json,
metrics/pruning/<name>.json) and writes the card with its test figures to metrics/merge/<name>.json.
"""
from pipeline.outputs import write, write_evaluation
from pipeline.stage import MERGED, METRICS, PREPARED, begin, declared_paths, track, user_errors

from anyorder.data.prepared import load_split
from anyorder.device import resolve_device
from anyorder.evaluation.intervals import pack_tree
from anyorder.evaluation.record import evaluate_and_prune
from anyorder.model.merge import Scorer
from anyorder.model.merge_run import (load_sources, merge_extra, merge_with_card, plan_merge,
                                      save_merged, with_test)


def main() -> None:
    stage = begin(__doc__, "merge", foreach="name")
    name, cfg = stage.args.name, stage.settings.merge
    entry = cfg.models[name]
    with user_errors():
        device = resolve_device(cfg.device, "merge.device")
        evaluate_device = resolve_device(stage.settings.evaluate.device, "evaluate.device")
        pruning_device = resolve_device(stage.settings.pruning.device, "pruning.device")
        sources, models = load_sources(name, entry, declared_paths(stage))
        val, test = load_split(PREPARED, "val"), load_split(PREPARED, "test")
        # Recipes that need no scoring (random, manual) are made and checked before compute.
        context, early = plan_merge(entry, sources, models, Scorer(
            *val, cfg.num_orders, cfg.order_seed, cfg.batch_size, device))
    with track(stage) as mlflow:
        result, merged, card = merge_with_card(name, entry, context, early)
        save_merged(MERGED / name, merged, result.recipe, card)
        evaluation, pruning, outcomes = evaluate_and_prune(
            stage.settings.evaluate, stage.settings.pruning, merged, name, entry.seed, test,
            evaluate_device, pruning_device, merge_extra(sources))
        write_evaluation(mlflow, evaluation, pruning)
        write(METRICS / "outcomes" / f"{name}.json", pack_tree({"orders": outcomes}))
        write(METRICS / "merge" / f"{name}.json", with_test(card, evaluation, pruning))
        validation = card["validation"]
        mlflow.log_metrics({f"val_{key}": validation[key]
                            for key in ("merged", "best_source", "sources_mean")})
        mlflow.log_dict(card, "merge.json")
        mlflow.log_artifacts(str(MERGED / name), artifact_path="model")
    slots = " ".join(f"{s}:{b}" for s, b in result.recipe.slots)
    print(f"{stage.name}: {entry.generator} recipe [{slots}]; validation "
          f"{validation['merged']:.4f} (sources "
          f"{', '.join(f'{s} {v:.4f}' for s, v in validation['sources'].items())}); test "
          f"{evaluation['arbitrary']['mean']:.4f} over {evaluation['arbitrary']['count']} orders")


if __name__ == "__main__":
    main()
