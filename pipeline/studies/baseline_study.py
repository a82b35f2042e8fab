"""The baseline study (`make baseline-study`): how long must pre-training run for the sequential
baseline to reach its plateau, and does fine-tuning need augmentation?

For each pre-training length given (params.yaml's `pretrain` recipe, only `epochs` changed), on the
prepared default data: the pre-trained model, then params.yaml's fine-tune (`finetune`, its
epochs, lr and schedule) of the sequential baseline and of plain LayerShuffle from it, each with
the fine-tune's random shifts (`finetune.train.shift_pixels`) and without (the paper's setting).
Everything is scored on the validation split (sequential, and over `select.num_orders` random
orders: what chooses) and on the test split (sequential, and over `evaluate.num_orders` random
orders: reported only). Writes metrics/study/baseline.{json,md}. Reads data/prepared (run
`make run`, or at least `dvc repro prepare`, first).

    python -m pipeline.studies.baseline_study --epochs 30 60 90 120 [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from pipeline.stage import PREPARED

from anyorder.config import load_settings
from anyorder.data.prepared import load_meta, load_split
from anyorder.evaluation.accuracy import accuracy_for_orders, random_order_accuracy
from anyorder.files import atomic_write_bytes, atomic_write_json
from anyorder.model.spec import model_spec, variant_spec
from anyorder.model.vit import build_model
from anyorder.training.loop import train_model

OUT = Path("metrics/study")


def scores(model, data: tuple, num_orders: int, seed: int) -> dict:
    """Sequential accuracy and the mean over `num_orders` seeded random orders."""
    return {"sequential": accuracy_for_orders(model, *data, [None])[0],
            "random_orders": random_order_accuracy(model, *data, num_orders, seed)["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 60, 90, 120])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    train, val, test = (load_split(PREPARED, s) for s in ("train", "val", "test"))
    meta = load_meta(PREPARED)
    spec = model_spec(settings.model, meta["image_size"], meta["class_names"])
    shifts = sorted({0, settings.finetune.train.shift_pixels})

    def scored(model) -> dict:
        return {"val": scores(model, val, settings.select.num_orders, settings.select.order_seed),
                "test": scores(model, test, settings.evaluate.num_orders,
                               settings.evaluate.order_seed)}

    results: dict = {}
    for epochs in args.epochs:
        started = time.perf_counter()
        pretrained = build_model(spec, settings.model.pretrained, seed=settings.pretrain.seed)
        train_model(pretrained, train, val, dataclasses.replace(settings.pretrain.train,
                                                                 epochs=epochs),
                    settings.pretrain.seed, progress=False)
        row = {"pretrained": scored(pretrained)}
        for variant in ("sequential", "ls"):
            run = dataclasses.replace(settings.finetune.runs[settings.report.baseline],
                                      variant=variant)
            for shift in shifts:
                model = build_model(variant_spec(pretrained.spec, run), seed=run.seed)
                model.load_state_dict(pretrained.state_dict())
                cfg = dataclasses.replace(run.training(settings.finetune.train), shift_pixels=shift)
                train_model(model, train, val, cfg, run.seed, progress=False)
                row[f"{variant}_shift{shift}"] = scored(model)
        results[str(epochs)] = row
        print(f"[baseline study] pre-training {epochs} epochs: "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    summary = {"pretrain_epochs": args.epochs, "fine_tune_epochs": settings.finetune.train.epochs,
               "shifts": shifts, "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "baseline.json", summary)
    atomic_write_bytes(OUT / "baseline.md", markdown(summary).encode())
    print(markdown(summary))


def markdown(summary: dict) -> str:
    lines = [f"Accuracy (%) after pre-training for the given epochs, then {summary['fine_tune_epochs']}"
             f" fine-tune epochs; shift: random shift augmentation of the fine-tune (pixels). "
             f"Validation chooses; test is reported.", "",
             "| pre-training epochs | model | val: sequential | val: random orders | "
             "test: sequential | test: random orders |", "|---|---|---|---|---|---|"]
    for epochs, row in summary["results"].items():
        for name, s in row.items():
            lines.append(f"| {epochs} | {name} | {100 * s['val']['sequential']:.2f} | "
                         f"{100 * s['val']['random_orders']:.2f} | "
                         f"{100 * s['test']['sequential']:.2f} | "
                         f"{100 * s['test']['random_orders']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
