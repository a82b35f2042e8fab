"""The nullspace study (`make study`): every nullspace arm of params.yaml (nullspace.arms and
nullspace.study_arms, the random-noise controls) with several seeds.

The default pipeline runs each arm with one seed, and the random-noise controls not at all. This
runs each arm's start model and noise kind with every seed given, on the whole test split, and
writes metrics/study/nullspace.json and metrics/study/nullspace.md: per arm mean +- std over the
seeds, the differences nullspace - plain and nullspace - random with 95% bootstrap intervals over
test images and seeds, and every epoch's noise synthesis. It reads what `make run` wrote (data/prepared,
data/corrupted, the start models) and decides nothing on the test split: every arm trains for
nullspace.train.epochs and its last epoch is the model (validation accuracy is recorded, not used).

    python -m pipeline.studies.study --seeds 0 1 2        # make study
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.stage import CORRUPTED, PREPARED, load_corrupted

from anyorder.model.checkpoint import load_model
from anyorder.config import FINETUNED, load_settings, model_dir
from anyorder.robustness.corruptions import CORRUPTIONS
from anyorder.data.prepared import load_split
from anyorder.files import atomic_write_bytes, atomic_write_json
from anyorder.robustness.nullspace import epoch_noise
from anyorder.robustness.evaluate import evaluate_robustness
from anyorder.robustness.record import synthesis_per_epoch
from anyorder.evaluation.intervals import difference
from anyorder.report import interval_text, robustness_table
from anyorder.device import resolve_device
from anyorder.training.loop import train_model

OUT = Path("metrics/study")
HEADLINE = ["clean", "mean_corruption_accuracy", "mce_vs_baseline", "fgsm@1/255", "fgsm@2/255",
            "fgsm@4/255", "fgsm@8/255", "pgd@1/255", "pgd@2/255", "pgd@4/255", "pgd@8/255",
            "synthesised_noise_accuracy"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def load_splits(starts: list[str]) -> tuple:
    """(test, train, val) of data/prepared; exits naming what is missing if `make run` has not
    written the prepared data, the corrupted sets or a start model."""
    missing = [p for p in [PREPARED / "test_x.npy", CORRUPTED / "manifest.json"] +
               [Path(s) / "model.json" for s in starts] if not p.is_file()]
    if missing:
        sys.exit(f"error: {', '.join(map(str, missing))} missing: run `make run` first")
    return tuple(load_split(PREPARED, s) for s in ("test", "train", "val"))


def train_and_evaluate(arms: dict, starts: list[str], seeds: list[int], cfg, splits: tuple,
                       corrupted, robust, synthesis, device, started: float) -> dict[str, dict]:
    """The robustness of every start model and of every arm trained with every seed, by name
    (start:<model>, <arm>:seed<seed>)."""
    test, train, val = splits
    results: dict[str, dict] = {}

    def evaluate(name: str, model) -> None:
        results[name] = evaluate_robustness(model, *test, corrupted, train[0], robust, device)
        print(f"[study] {name}: {time.perf_counter() - started:.0f}s", flush=True)

    for start in starts:
        evaluate(f"start:{start}", load_model(start))
    for arm_name, arm in arms.items():
        for seed in seeds:
            model = load_model(arm.start)
            history = train_model(model, train, val, cfg.train, seed, progress=False,
                                  epoch_noise=epoch_noise(arm.noise, synthesis, train[0],
                                                          device)).history
            evaluate(f"{arm_name}:seed{seed}", model)
            results[f"{arm_name}:seed{seed}"]["val_accuracy"] = history[-1][
                "val_accuracy_sequential"]
            records = synthesis_per_epoch(history)
            if records:
                results[f"{arm_name}:seed{seed}"]["training_synthesis"] = {
                    "converged_every_epoch": all(r["converged"] for r in records),
                    "epochs": records}
    return results


def arm_statistics(table: dict, results: dict, arms: dict, seeds: list[int]) -> dict:
    """Per arm and mode: mean and std over the seeds of the headline figures, and the
    arbitrary-order accuracy kept from the start model where it has one."""
    stats = {}
    for arm_name, arm in arms.items():
        rows = [table[f"{arm_name}:seed{seed}"] for seed in seeds]
        stats[arm_name] = {mode: {k: _stats([r[mode][k] for r in rows]) for k in HEADLINE}
                           for mode in rows[0] if mode != "variant"}
        stats[arm_name]["start"] = arm.start
        stats[arm_name]["noise"] = arm.noise
    for arm_name, arm in arms.items():  # arbitrary-order accuracy kept by fine-tuning
        start_clean = results[f"start:{arm.start}"]["clean_accuracy"]
        if "random_orders" in start_clean:
            stats[arm_name]["random_orders_accuracy_kept"] = _stats([
                results[f"{arm_name}:seed{seed}"]["clean_accuracy"]["random_orders"]
                / start_clean["random_orders"] for seed in seeds])
    return stats


def arm_differences(results: dict, arms: dict, seeds: list[int]) -> dict:
    """Every nullspace arm minus every other arm from the same start model, per mode."""
    out = {}
    for arm_name, arm in arms.items():
        if arm.noise != "nullspace":
            continue
        for other_name, other in arms.items():
            if other.start == arm.start and other.noise != "nullspace":
                out[f"{arm_name} - {other_name}"] = {
                    mode: differences([results[f"{arm_name}:seed{s}"] for s in seeds],
                                      [results[f"{other_name}:seed{s}"] for s in seeds], mode)
                    for mode in results[f"{arm_name}:seed{seeds[0]}"]["outcomes"]}
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    cfg, robust = settings.nullspace, replace(settings.robustness, num_images=None)
    arms = {name: replace(arm, start=str(model_dir(settings, arm.start)))
            for name, arm in {**cfg.arms, **cfg.study_arms}.items()}
    device = resolve_device(cfg.train.device, "nullspace.train.device")
    starts = sorted({arm.start for arm in arms.values()})
    splits = load_splits(starts)
    corrupted = load_corrupted(settings)  # checked against robustness.corruptions
    synthesis = settings.nullspace.synthesis
    started = time.perf_counter()
    results = train_and_evaluate(arms, starts, args.seeds, cfg, splits, corrupted, robust,
                                 synthesis, device, started)
    baseline = f"start:{FINETUNED / settings.report.baseline}"
    if baseline not in results:
        sys.exit(f"error: report.baseline {settings.report.baseline} is no arm's start model "
                 f"({', '.join(starts)}): the study compares arms with it")
    table = robustness_table(results, baseline)["models"]
    summary = {"seeds": args.seeds, "num_test_images": int(len(splits[0][1])),
               "baseline": baseline, "epsilon": synthesis.epsilon,
               "corruptions": list(robust.corruptions.names) == list(CORRUPTIONS),
               "arms": arm_statistics(table, results, arms, args.seeds),
               "differences": arm_differences(results, arms, args.seeds), "runs": table}
    summary["synthesis"] = {name: r["training_synthesis"] for name, r in results.items()
                            if "training_synthesis" in r}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "nullspace.json", summary)
    atomic_write_bytes(OUT / "nullspace.md", markdown(summary).encode())
    print(markdown(summary))
    print(f"[study] took {time.perf_counter() - started:.0f}s")


def differences(ours: list[dict], theirs: list[dict], mode: str) -> dict:
    """Arm minus control in one mode: each headline figure's difference with a 95% interval
    that resamples the test images (paired) and the seeds (anyorder.evaluation.intervals.difference).
    Corruptions: each seed's per-image accuracy over the fixed set of corrupted versions."""
    def rows(results: list[dict], pick) -> np.ndarray:
        return np.stack([pick(r["outcomes"][mode]) for r in results]).astype(float)

    def corrupted(outcome: dict) -> np.ndarray:
        return np.mean([hits for by_severity in outcome["corruptions"].values()
                        for hits in by_severity.values()], axis=0)

    out = {"clean": difference(rows(ours, lambda o: o["clean"]), rows(theirs, lambda o: o["clean"])),
           "mean_corruption_accuracy": difference(rows(ours, corrupted), rows(theirs, corrupted))}
    for attack, by_eps in ours[0]["outcomes"][mode]["attacks"].items():
        for eps in by_eps:
            def pick(o, attack=attack, eps=eps):
                return o["attacks"][attack][eps]
            out[f"{attack}@{eps}"] = difference(rows(ours, pick), rows(theirs, pick))
    return out


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1
            else 0.0, "values": [float(v) for v in array]}


def markdown(summary: dict) -> str:
    columns = ["clean", "mean_corruption_accuracy", "mce_vs_baseline", "fgsm@2/255", "fgsm@8/255",
               "pgd@2/255", "pgd@8/255"]
    lines = [f"Seeds {summary['seeds']}, all {summary['num_test_images']} test images; "
             f"mean +- std over seeds (accuracy in %, mCE relative to {summary['baseline']}).", "",
             "| arm | mode | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, by_mode in summary["arms"].items():
        for mode, row in by_mode.items():
            if mode in ("start", "noise", "random_orders_accuracy_kept"):
                continue
            lines.append(f"| {name} | {mode} | " + " | ".join(
                f"{row[c]['mean'] * (1 if c.startswith('mce') else 100):.2f} +- "
                f"{row[c]['std'] * (1 if c.startswith('mce') else 100):.2f}" for c in columns) + " |")
    shown = [c for c in columns if c != "mce_vs_baseline"]
    lines += ["", "Differences (points), with 95% bootstrap intervals over the test images (paired) "
              "and the seeds:", "", "| difference | mode | " + " | ".join(shown) + " |",
              "|---|---|" + "---|" * len(shown)]
    for name, by_mode in summary["differences"].items():
        for mode, row in by_mode.items():
            lines.append(f"| {name} | {mode} | " + " | ".join(interval_text(row.get(c))
                                                             for c in shown) + " |")
    kept = {name: arm["random_orders_accuracy_kept"] for name, arm in summary["arms"].items()
            if "random_orders_accuracy_kept" in arm}
    if kept:
        lines += ["", "Accuracy in random orders kept from the start model (arm / start): " + ", ".join(
            f"{name} {k['mean'] * 100:.1f}% +- {k['std'] * 100:.1f}" for name, k in kept.items())]
    synthesis = [r for runs in summary["synthesis"].values() for r in runs["epochs"]]
    if synthesis:
        lines += ["", f"Noise synthesis of the nullspace arms: {sum(r['converged'] for r in synthesis)}"
                  f" of {len(synthesis)} epochs converged; steps {min(r['steps'] for r in synthesis)}"
                  f"-{max(r['steps'] for r in synthesis)}, distance at most "
                  f"{max(r['distance'] for r in synthesis):.4f} (epsilon "
                  f"{summary['epsilon']}); random noise of the same norm: "
                  f"{min(r['random_distance'] for r in synthesis):.3f}-"
                  f"{max(r['random_distance'] for r in synthesis):.3f}."]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
