"""The recipe study (`make recipe-study`): does the LayerShuffle recipe of params.yaml hold on data
harder than the embedded digits?

The harder setting is built here from what the project ships, deterministically: 10,000 28x28
images ("distorted digits", 1,000 per class) made from the 1,797 embedded 8x8 digits, each
upscaled, rotated, scaled, sheared and shifted, with a dimmed fragment of another digit as clutter
and Gaussian pixel noise, at one of two levels (LEVELS: medium, hard). It is written in the user's
npz format and prepared with params.yaml's data settings: only `data.path` differs from the
default pipeline (6,500 train, 1,500 validation, 2,000 test).

On it the study runs the default pipeline's recipe: the sequential pre-training (params.yaml
`pretrain`), the sequential fine-tune (the baseline, `finetune.runs.sequential`), and LayerShuffle
fine-tunes: the candidate recipes below, each a FinetuneRun of params.yaml's vocabulary, all from
the same pre-trained model. Every model is scored on the validation split over `select.num_orders`
random orders (that is what chooses a recipe) and on the test split sequentially and over
`evaluate.num_orders` random orders (reported, never used to choose). Writes
metrics/study/recipe_<level>.{json,md}. Models are cached under .anyorder/recipe_study/<level>
(a rerun retrains only what changed: recipe, spec or start model; --fresh starts over).

    python -m pipeline.studies.recipe_study [--level medium|hard] [--candidates NAME ...]
                                            [--also RUN ...] [--threads 2] [--fresh]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from anyorder.model.checkpoint import load_model, load_start_weights
from anyorder.config import load_settings
from anyorder.model.settings import FinetuneRun
from anyorder.data.prepare import prepare_dataset
from anyorder.data.prepared import load_split
from anyorder.evaluation.accuracy import evaluate_orders, select_best
from anyorder.files import atomic_write_bytes, atomic_write_json, npz_bytes
from anyorder.evaluation.intervals import difference, pack_tree, unpack_tree
from anyorder.model.spec import model_spec, resolve_image_size, variant_spec
from anyorder.model.vit import build_model
from anyorder.report import interval_text
from anyorder.training.loop import train_and_save

WORK_ROOT = Path(".anyorder/recipe_study")
OUT = Path("metrics/study")
SOURCE = Path("data/embedded/digits.npz")

# name -> the LS fine-tune (params.yaml's FinetuneRun fields). "ls" is the schedule LS had before
# this study (8 epochs, the fine-tunes' lr, one order per batch); the others change one thing or two.
# The baseline is finetune.runs.sequential with params.yaml's schedule (finetune.train.epochs).
CANDIDATES = {
    "ls": {"variant": "ls", "epochs": 8},
    "ls_sample": {"variant": "ls", "epochs": 8, "order_sampling": "sample"},
    "ls_lr2": {"variant": "ls", "epochs": 8, "lr_scale": 2.0},
    "ls_epochs2": {"variant": "ls", "epochs": 16},
    "ls_epochs3": {"variant": "ls", "epochs": 24},
    "ls_epochs2_lr2": {"variant": "ls", "epochs": 16, "lr_scale": 2.0},
    "ls_epochs2_sample": {"variant": "ls", "epochs": 16, "order_sampling": "sample"},
    "ls_epochs4": {"variant": "ls", "epochs": 32},
    # LayerShuffle already in pre-training: the pre-training recipe with variant ls, from scratch
    "ls_pretrained": {"variant": "ls", "epochs": 8, "start": "pretrain_ls"},
    "ls_pretrained_epochs2": {"variant": "ls", "epochs": 16, "start": "pretrain_ls"},
}


# How hard the distorted digits are: rotation (degrees), shear, scale range, shift (pixels), the
# clutter's brightness range, Gaussian pixel noise (sigma, of 255).
LEVELS = {
    "medium": dict(rotation=15, shear=0.1, scale=(0.9, 1.1), shift=2, clutter=(0.3, 0.5),
                   noise=20.0),
    "hard": dict(rotation=30, shear=0.3, scale=(0.8, 1.2), shift=3, clutter=(0.4, 0.8),
                 noise=35.0),
}


def distorted_digits(source: Path, level: str = "medium", count: int = 10_000, size: int = 28,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` distorted, cluttered, noisy `size`x`size` uint8 images from the 8x8 digits."""
    from PIL import Image

    how = LEVELS[level]
    with np.load(source, allow_pickle=False) as archive:
        digits, labels = archive["x"], archive["y"]
    rng = np.random.default_rng(seed)
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), count // 10)
                            for c in range(10)])
    rng.shuffle(picks)
    glyph = 18  # the digit's size before the distortion
    big = [np.asarray(Image.fromarray(d).resize((glyph, glyph), Image.BICUBIC), np.float32)
           for d in digits]
    out = np.zeros((len(picks), size, size), np.float32)
    centre = np.array([size / 2, size / 2])
    for k, i in enumerate(picks):
        canvas = np.zeros((size, size), np.float32)
        # clutter: a 9x9 piece of another digit, dimmed
        other = big[rng.integers(len(big))]
        r0, c0 = rng.integers(0, glyph - 9, 2)
        r, c = rng.integers(0, size - 9, 2)
        canvas[r:r + 9, c:c + 9] = other[r0:r0 + 9, c0:c0 + 9] * rng.uniform(*how["clutter"])
        digit = np.zeros((size, size), np.float32)
        o = (size - glyph) // 2
        digit[o:o + glyph, o:o + glyph] = big[i]
        angle = np.deg2rad(rng.uniform(-how["rotation"], how["rotation"]))
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        forward = rotation @ np.array([[1.0, rng.uniform(-how["shear"], how["shear"])],
                                       [0.0, 1.0]]) * rng.uniform(*how["scale"])
        inverse = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
        offset = centre - inverse @ (centre + rng.uniform(-how["shift"], how["shift"], 2))
        warped = Image.fromarray(digit).transform(
            (size, size), Image.AFFINE, (*inverse[0], offset[0], *inverse[1], offset[1]),
            resample=Image.BILINEAR)
        canvas = np.maximum(canvas, np.asarray(warped))
        out[k] = canvas + rng.normal(0.0, how["noise"], canvas.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), labels[picks]


def candidate_run(spec: dict, shared) -> FinetuneRun:
    """A candidate as the FinetuneRun params.yaml would hold (epochs / lr as numbers)."""
    fields = {k: v for k, v in spec.items() if not k.endswith("_scale") and k != "start"}
    if "lr_scale" in spec:
        fields["lr"] = shared.lr * spec["lr_scale"]
    run = FinetuneRun(**fields)
    run.check("candidate")
    return run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                        choices=list(CANDIDATES), metavar="NAME")
    parser.add_argument("--also", nargs="+", default=[], metavar="RUN",
                        help="runs of params.yaml's finetune.runs to score too (e.g. ls_s0: "
                             "the recipe as it stands)")
    parser.add_argument("--level", default="medium", choices=list(LEVELS))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="retrain everything")
    return parser.parse_args()


def prepare_data(work: Path, level: str, settings) -> Path:
    """The distorted digits of `level`, prepared with params.yaml's data settings (built once)."""
    data, prepared = work / "distorted_digits.npz", work / "prepared"
    if not (prepared / "meta.json").is_file():
        images, labels = distorted_digits(SOURCE, level)
        atomic_write_bytes(data, npz_bytes({"x": images, "y": labels,
                                            "class_names": np.array([str(c) for c in range(10)])}))
        d = settings.data
        prepare_dataset("npz", str(data), resolve_image_size(settings.model, d.image_size),
                        d.val_fraction, d.test_fraction, d.split_seed, prepared)
    return prepared


class StudyModels:
    """The study's models under `work`, each retrained only when its recipe, spec or start
    model changed."""

    def __init__(self, work: Path, prepared: Path, settings):
        self.work, self.prepared, self.settings = work, prepared, settings

    def trained(self, name: str, make, cfg, seed: int, start: str = "", **knobs):
        """The model trained so, from the cache when its recipe, spec and start are the same."""
        out = self.work / name
        model = make()
        key = {"config": dataclasses.asdict(cfg), "seed": seed, "knobs": knobs,
               "spec": model.spec.to_dict(),
               "start": start and hashlib.sha256(
                   (self.work / start / "model.safetensors").read_bytes()).hexdigest()}
        key_file = out / "study_key.json"
        if not (key_file.is_file() and json.loads(key_file.read_text()) == key):
            if out.exists():
                shutil.rmtree(out)
            started = time.perf_counter()
            train_and_save(model, self.prepared, cfg, seed, out,
                           state_dir=self.work / "state" / name, **knobs)
            atomic_write_json(key_file, key)
            print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        return load_model(out)

    def finetuned(self, name: str, run: FinetuneRun, start: str = "pretrain"):
        def make():
            model = build_model(variant_spec(load_model(self.work / start).spec, run),
                                seed=run.seed)
            load_start_weights(model, self.work / start)
            return model
        knobs = {k: v for k in ("order_sampling", "position_loss_weight")
                 if (v := run.knob(k)) is not None}
        return self.trained(name, make, run.training(self.settings.finetune.train), run.seed, start,
                            **knobs)


def train_models(cache: StudyModels, settings, args: argparse.Namespace) -> tuple:
    """The pre-trained model(s), then the baseline, the --also runs and the candidates
    fine-tuned from them; returns (runs, their start models, the fine-tuned models)."""
    pre = settings.pretrain
    spec = model_spec(settings.model, resolve_image_size(settings.model, settings.data.image_size),
                      [str(c) for c in range(10)])
    cache.trained("pretrain", lambda: build_model(spec, settings.model.pretrained, seed=pre.seed),
                  pre.train, pre.seed)
    if any(CANDIDATES[name].get("start") == "pretrain_ls" for name in args.candidates):
        ls_spec = dataclasses.replace(spec, variant="ls")
        cache.trained("pretrain_ls", lambda: build_model(ls_spec, settings.model.pretrained,
                                                         seed=pre.seed), pre.train, pre.seed)
    runs = {"sequential": settings.finetune.runs["sequential"]}
    runs.update({name: settings.finetune.runs[name] for name in args.also})
    runs.update({name: candidate_run(CANDIDATES[name], settings.finetune.train)
                 for name in args.candidates})
    starts = {name: CANDIDATES.get(name, {}).get("start", "pretrain") if name in args.candidates
              else "pretrain" for name in runs}
    models = {name: cache.finetuned(name, run, starts[name]) for name, run in runs.items()}
    return runs, starts, models


def score(models: dict, runs: dict, starts: dict, work: Path, settings, val, test) -> tuple:
    """Every model on the validation split (random orders) and the test split (cached under
    its directory); returns (results, per-image test outcomes) by run name."""
    sel, ev = settings.select, settings.evaluate
    _, val_scores = select_best(models, *val, sel.num_orders, sel.order_seed, sel.batch_size)
    results, outcomes = {}, {}
    for name, model in models.items():
        cached = work / name / "test_evaluation.json"  # the study's, not the model's
        if not cached.is_file() or "outcomes" not in json.loads(cached.read_text()):
            atomic_write_json(cached, pack_tree(evaluate_orders(
                model, *test, ev.num_orders, ev.order_seed, ev.batch_size)))
        test_eval = unpack_tree(json.loads(cached.read_text()))
        outcomes[name] = test_eval["outcomes"]
        final = _final(work / name)
        results[name] = {
            "run": dataclasses.asdict(runs[name]), "start": starts[name],
            "epochs": runs[name].training(settings.finetune.train).epochs,
            "lr": runs[name].training(settings.finetune.train).lr,
            "train_accuracy_last_epoch": final.get("train_accuracy"),
            "val_random_orders": val_scores[name],
            "test_sequential": test_eval["sequential"],
            "test_random_orders": test_eval["arbitrary"]}
    return results, outcomes


def compare_with_baseline(results: dict, outcomes: dict) -> str:
    """Adds each run's test accuracy in random orders against the baseline's sequential one;
    returns the LayerShuffle run chosen on validation."""
    baseline = results["sequential"]["test_sequential"]
    shuffled = [n for n in results if n != "sequential"]
    chosen = max(shuffled, key=lambda n: results[n]["val_random_orders"]["mean"])
    for name in results:
        results[name]["test_random_over_baseline"] = \
            results[name]["test_random_orders"]["mean"] / baseline
        results[name]["test_random_minus_baseline"] = difference(
            np.stack(outcomes[name]["random_orders"]), outcomes["sequential"]["sequential"])
    return chosen


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    unknown = [name for name in args.also if name not in settings.finetune.runs]
    if unknown:
        sys.exit(f"--also: {', '.join(unknown)} not in finetune.runs of {args.params}")
    work = WORK_ROOT / args.level
    if args.fresh and work.exists():
        shutil.rmtree(work)
    prepared = prepare_data(work, args.level, settings)
    val, test = load_split(prepared, "val"), load_split(prepared, "test")
    runs, starts, models = train_models(StudyModels(work, prepared, settings), settings, args)
    results, outcomes = score(models, runs, starts, work, settings, val, test)
    chosen = compare_with_baseline(results, outcomes)
    report = {"data": {"built_from": str(SOURCE), "level": args.level, **LEVELS[args.level],
                       "images": 10_000, "size": 28,
                       "train": int(len(load_split(prepared, "train")[1])),
                       "val": int(len(val[1])), "test": int(len(test[1]))},
              "params": args.params, "baseline": "sequential", "chosen_on_val": chosen,
              "runs": results}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"recipe_{args.level}.json", report)
    atomic_write_bytes(OUT / f"recipe_{args.level}.md", _table(report).encode())
    print(_table(report))


def _final(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())["training"]["final"]


def _table(report: dict) -> str:
    lines = ["| run | epochs | lr | train acc (last epoch) | val, random orders | test, sequential "
             "| test, random orders (min) | / baseline | - baseline (points, 95% interval) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        mark = " (chosen on val)" if name == report["chosen_on_val"] else ""
        lines.append(
            f"| {name}{mark} | {r['epochs']} | {r['lr']:g} | {r['train_accuracy_last_epoch']:.4f} "
            f"| {r['val_random_orders']['mean']:.4f} | {r['test_sequential']:.4f} "
            f"| {r['test_random_orders']['mean']:.4f} ({r['test_random_orders']['min']:.4f}) "
            f"| {100 * r['test_random_over_baseline']:.1f}% "
            f"| {interval_text(r['test_random_minus_baseline'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
