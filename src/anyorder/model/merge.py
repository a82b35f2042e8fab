"""Frankenstein models: a model assembled block by block from several models that share a start.

A recipe is data (YAML): the sources (name -> model directory), the `base` source whose stem
(patch embedding, class token, position embedding), final norm and head the merged model takes,
and for each block slot the source and which of its blocks it takes. A block moves with what
belongs to it (an LS-pos adapter, an LS-pred head: `AnyOrderViT.block_state_prefixes`), and an
LS-pos block with the slot table it was trained with: a merge of several LS-pos runs gets one
table per block (`slot_tables: per_block`), since an adapter reading another run's table would
see slot embeddings it never learnt. The merged model is an ordinary checkpoint of the project.

Recipe generators, by name (`GENERATORS`), as mergekit and model soups describe theirs:
- `random`: each slot takes its block from a source drawn at random (seeded); block i of a
  source goes to slot i, since the sources' blocks i all descend from the same pre-trained block;
- `greedy`: start from the source best on validation; slot by slot, try every other source's
  block there and keep it only if validation accuracy (in arbitrary order for LayerShuffle
  models) does not drop (the greedy-soup rule, per block);
- `manual`: a recipe file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import yaml

from anyorder.errors import InputError
from anyorder.evaluation.accuracy import accuracy_for_orders, random_order_accuracy
from anyorder.files import atomic_write_bytes
from anyorder.model.spec import ModelSpec
from anyorder.model.vit import AnyOrderViT, build_model
from anyorder.evaluation.orders import generator_for

# What sources must agree on to exchange blocks (drop_path_rate is a training setting).
COMPATIBLE_FIELDS = ("arch", "variant", "img_size", "patch_size", "embed_dim", "depth",
                     "num_heads", "mlp_ratio", "num_classes", "class_names",
                     "position_embedding_dim", "mean", "std")


class MergeError(InputError):
    """A recipe that is malformed, names what does not exist, or mixes incompatible models."""


@dataclass
class Recipe:
    base: str                                  # source of stem, final norm, head
    sources: dict[str, str]                    # name -> model directory
    slots: list[tuple[str, int]]               # per block slot: (source name, its block index)
    generator: str = "manual"
    seed: Optional[int] = None

    def to_dict(self) -> dict:
        return {"generator": self.generator, "seed": self.seed, "base": self.base,
                "sources": dict(self.sources),
                "slots": [{"source": s, "block": b} for s, b in self.slots]}

    @classmethod
    def from_dict(cls, raw: object, where: str = "recipe") -> "Recipe":
        """A validated recipe; MergeError naming the field otherwise (nothing loaded yet)."""
        if not isinstance(raw, dict):
            raise MergeError(f"{where}: must be a mapping with base, sources and slots")
        unknown = sorted(set(raw) - {"generator", "seed", "base", "sources", "slots"})
        if unknown:
            raise MergeError(f"{where}: unknown key {unknown[0]!r} (known: base, sources, slots, "
                             f"generator, seed)")
        sources = raw.get("sources")
        if not isinstance(sources, dict) or not sources or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in sources.items()):
            raise MergeError(f"{where}.sources: must map each source name to a model directory, "
                             f"got {sources!r}")
        base = raw.get("base")
        if base not in sources:
            raise MergeError(f"{where}.base: {base!r} is not one of the sources "
                             f"({', '.join(sources)})")
        slots = raw.get("slots")
        if not isinstance(slots, list) or not slots:
            raise MergeError(f"{where}.slots: must list one {{source, block}} per block slot")
        parsed = []
        for i, slot in enumerate(slots):
            if not isinstance(slot, dict) or set(slot) != {"source", "block"}:
                raise MergeError(f"{where}.slots[{i}]: must be {{source: <name>, block: <index>}}, "
                                 f"got {slot!r}")
            if slot["source"] not in sources:
                raise MergeError(f"{where}.slots[{i}].source: {slot['source']!r} is not one of "
                                 f"the sources ({', '.join(sources)})")
            if isinstance(slot["block"], bool) or not isinstance(slot["block"], int) \
                    or slot["block"] < 0:
                raise MergeError(f"{where}.slots[{i}].block: must be a block index >= 0, got "
                                 f"{slot['block']!r}")
            parsed.append((slot["source"], slot["block"]))
        seed = raw.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise MergeError(f"{where}.seed: must be an integer or null, got {seed!r}")
        generator = raw.get("generator", "manual")
        if generator not in GENERATORS:
            raise MergeError(f"{where}.generator: unknown {generator!r} (known: "
                             f"{', '.join(GENERATORS)})")
        return cls(base=base, sources=dict(sources), slots=parsed, generator=generator, seed=seed)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.to_yaml().encode())

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise MergeError(f"{path}: no such recipe file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise MergeError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(raw, str(path))


def check_compatible(specs: dict[str, ModelSpec]) -> None:
    """MergeError naming the first field two sources disagree on."""
    names = list(specs)
    first = specs[names[0]]
    for name in names[1:]:
        for field_name in COMPATIBLE_FIELDS:
            a, b = getattr(first, field_name), getattr(specs[name], field_name)
            if a != b:
                shown = (lambda v: f"{len(v)} classes" if field_name == "class_names" else repr(v))
                raise MergeError(
                    f"sources {names[0]} and {name} differ in {field_name}: {shown(a)} vs "
                    f"{shown(b)}; a Frankenstein model combines blocks of one architecture and "
                    f"variant, fine-tuned from one start")


def merge_models(recipe: Recipe, models: dict[str, AnyOrderViT]) -> AnyOrderViT:
    """The model the recipe describes, from loaded source models (keyed as in recipe.sources)."""
    missing = [name for name in recipe.sources if name not in models]
    if missing:
        raise MergeError(f"recipe source {missing[0]!r} was not loaded")
    check_compatible({name: models[name].spec for name in recipe.sources})
    base = models[recipe.base]
    if len(recipe.slots) != base.depth:
        raise MergeError(f"recipe has {len(recipe.slots)} slots, its sources have {base.depth} "
                         f"blocks: give one slot per block (prune the merged model to run fewer)")
    for i, (source, block) in enumerate(recipe.slots):
        if block >= models[source].depth:
            raise MergeError(f"recipe slots[{i}].block: {source} has no block {block} (it has "
                             f"{models[source].depth})")
    state = dict(base.state_dict())
    for slot, (source, block) in enumerate(recipe.slots):
        source_state = models[source].state_dict()
        for own, theirs in zip(base.block_state_prefixes(slot),
                               base.block_state_prefixes(block)):
            for key in [k for k in state if k.startswith(own)]:
                del state[key]
            for key, value in source_state.items():
                if key.startswith(theirs):
                    state[own + key[len(theirs):]] = value
    spec = ModelSpec.from_dict(base.spec.to_dict())
    if base.behaviour.slot_input:  # each block keeps the slot table it was trained with
        tables = [block_slot_table(models[source], block) for source, block in recipe.slots]
        if any(not torch.equal(t, tables[0]) for t in tables) or spec.slot_tables != "shared":
            for key in ("slot_table", "block_slot_tables"):
                state.pop(key, None)
            state["block_slot_tables"] = torch.stack(tables)
            spec.slot_tables = "per_block"
    merged = build_model(spec, seed=0)
    merged.load_state_dict({k: v.clone() for k, v in state.items()})
    return merged


def block_slot_table(model: AnyOrderViT, block: int) -> torch.Tensor:
    """LS-pos: the slot table (slots x width) block `block` of `model` reads its slot from."""
    return model.behaviour.slot_table(model, block).detach()


def slot_table_sources(recipe: Recipe, merged: AnyOrderViT) -> Optional[dict]:
    """For the merge card: which slot table each block of an LS-pos merge reads (the table of
    the source it came from); None for other variants."""
    if not merged.behaviour.slot_input:
        return None
    return {"layout": merged.spec.slot_tables,
            "per_slot": [f"{source}:{block}" for source, block in recipe.slots]}


# -- scoring and generators ----------------------------------------------------------------------

@dataclass
class Scorer:
    """Validation accuracy of a model: the mean over seeded random orders for a LayerShuffle
    model (arbitrary order), the sequential order for a sequential one."""
    images: np.ndarray
    labels: np.ndarray
    num_orders: int
    seed: int
    batch_size: int = 256
    device: str | torch.device = "cpu"

    def mode(self, model: AnyOrderViT) -> str:
        return "arbitrary" if model.behaviour.shuffled_training else "sequential"

    def __call__(self, model: AnyOrderViT) -> float:
        if model.behaviour.shuffled_training:
            return random_order_accuracy(model, self.images, self.labels, self.num_orders,
                                         self.seed, self.batch_size, self.device)["mean"]
        return accuracy_for_orders(model, self.images, self.labels, [None], self.batch_size,
                                   self.device)[0]


@dataclass
class MergeContext:
    sources: dict[str, str]                    # name -> model directory
    models: dict[str, AnyOrderViT]             # loaded, keyed like sources
    base: Optional[str] = None                 # stem/head source (None: generator decides)
    seed: int = 0
    scorer: Optional[Scorer] = None            # validation accuracy (greedy)
    recipe_path: Optional[str] = None          # manual


@dataclass
class MergeResult:
    recipe: Recipe
    history: list[dict] = field(default_factory=list)   # greedy: every candidate tried
    source_scores: dict[str, float] = field(default_factory=dict)


GENERATORS: dict[str, Callable[[MergeContext], MergeResult]] = {}


def generator(name: str):
    def register(fn: Callable[[MergeContext], MergeResult]):
        GENERATORS[name] = fn
        return fn
    return register


def _depth(context: MergeContext) -> int:
    check_compatible({name: context.models[name].spec for name in context.sources})
    return next(iter(context.models.values())).depth


@generator("random")
def random_recipe(context: MergeContext) -> MergeResult:
    depth = _depth(context)
    names = list(context.sources)
    base = context.base or names[0]
    if base not in context.sources:
        raise MergeError(f"base {base!r} is not one of the sources ({', '.join(names)})")
    picks = torch.randint(len(names), (depth,), generator=generator_for(context.seed)).tolist()
    slots = [(names[p], slot) for slot, p in enumerate(picks)]
    return MergeResult(Recipe(base, dict(context.sources), slots, "random", context.seed))


@generator("greedy")
def greedy_recipe(context: MergeContext) -> MergeResult:
    if context.scorer is None:
        raise ValueError("the greedy generator needs a validation scorer")
    depth = _depth(context)
    names = list(context.sources)
    scores = {name: context.scorer(context.models[name]) for name in names}
    start = max(names, key=lambda n: (scores[n], -names.index(n)))  # ties: the first listed
    base = context.base or start
    if base not in context.sources:
        raise MergeError(f"base {base!r} is not one of the sources ({', '.join(names)})")
    current = Recipe(base, dict(context.sources), [(start, slot) for slot in range(depth)],
                     "greedy", context.seed)
    current_score = context.scorer(merge_models(current, context.models)) \
        if base != start else scores[start]
    history = [{"step": 0, "slot": None, "source": start, "score": current_score,
                "accepted": True, "note": f"start: every block from {start}, the best source"}]
    for slot in range(depth):
        for name in [n for n in names if n != current.slots[slot][0]]:  # each other source once
            trial = Recipe(base, dict(context.sources), list(current.slots), "greedy",
                           context.seed)
            trial.slots[slot] = (name, slot)
            score = context.scorer(merge_models(trial, context.models))
            accepted = score >= current_score   # keep it only if accuracy does not drop
            history.append({"step": len(history), "slot": slot, "source": name, "score": score,
                            "previous": current_score, "accepted": accepted})
            if accepted:
                current, current_score = trial, score
    return MergeResult(current, history, scores)


@generator("manual")
def manual_recipe(context: MergeContext) -> MergeResult:
    if not context.recipe_path:
        raise MergeError("the manual generator needs a recipe file (recipe: <path>)")
    recipe = Recipe.load(context.recipe_path)
    recipe.generator = "manual"
    return MergeResult(recipe)
