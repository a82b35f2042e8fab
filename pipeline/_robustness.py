"""What evaluate@<run> and nullspace@<arm> share: the robustness evaluation of one model, written
to metrics/robustness/<name>.json. Kept out of _stage.py so that stages that evaluate no
robustness do not depend on that code."""
from __future__ import annotations

from typing import Optional

import numpy as np

from _stage import CORRUPTED, METRICS, PREPARED, fail, read_json

from anyorder.data.prepared import load_split
from anyorder.files import atomic_write_json
from anyorder.robustness.evaluate import accuracy, evaluate_robustness, order_groups


def synthesis_per_epoch(history: list[dict]) -> list[dict]:
    """The noise each epoch trained on (its synthesis), from the training history; a warning
    line for every epoch whose synthesis missed epsilon."""
    records = [{"epoch": r["epoch"], **{k[len("noise_"):]: v for k, v in r.items()
                                        if k.startswith("noise_")}}
               for r in history if "noise_steps" in r]
    for r in records:
        if not r["converged"]:
            print(f"warning: epoch {r['epoch']}: the noise synthesis did not reach epsilon "
                  f"(distance {r['distance']:.4g} after {r['steps']} steps): this epoch trained "
                  f"on noise that is not in the approximate nullspace")
    return records


def load_corrupted(settings) -> dict[str, np.ndarray]:
    """The corrupted test sets the corrupt stage wrote, checked against the settings."""
    cfg = settings.robustness.corruptions
    manifest = read_json(CORRUPTED / "manifest.json", "corrupt")
    if manifest.get("severities") != list(cfg.severities) or not set(cfg.names) <= set(
            manifest.get("names", [])):
        fail(f"{CORRUPTED} holds {manifest.get('names')} at severities "
             f"{manifest.get('severities')}, not what robustness.corruptions asks for; run the "
             f"corrupt stage again (dvc repro corrupt)")
    out = {}
    for name in cfg.names:
        with np.load(CORRUPTED / f"{name}.npz", allow_pickle=False) as archive:
            out[name] = archive["x"]
    return out


def evaluate_and_write(settings, model, name: str, device, mlflow, start=None,
                       training_synthesis: Optional[list[dict]] = None,
                       extra: Optional[dict] = None) -> tuple[dict, dict]:
    """Robustness of `model` on the test split, to metrics/robustness/<name>.json and MLflow;
    with `start` (the model a fine-tune began from), also its clean accuracy in the same modes;
    with `training_synthesis` (a nullspace fine-tune's noise, per epoch), that record too.
    Returns the metrics and the per-image outcomes (for metrics/outcomes/<name>.json)."""
    images, labels = load_split(PREPARED, "test")
    train_images, _ = load_split(PREPARED, "train")
    corrupted = load_corrupted(settings)
    cfg = settings.robustness
    result = evaluate_robustness(model, images, labels, corrupted, train_images, cfg,
                                 settings.nullspace.synthesis, device)
    outcomes = result.pop("outcomes")
    metrics = {"model": name, **(extra or {}), **result}
    if start is not None:
        modes = order_groups(start, len(labels), cfg.num_orders, cfg.order_seed)
        metrics["start_clean_accuracy"] = {
            mode: accuracy(start, images, labels, groups, cfg.batch_size, device)
            for mode, groups in modes.items()}
    if training_synthesis is not None:
        metrics["training_synthesis"] = {
            "converged_every_epoch": all(r["converged"] for r in training_synthesis),
            "epochs": training_synthesis}
    path = METRICS / "robustness" / f"{name}.json"
    atomic_write_json(path, metrics)
    for mode in result["modes"]:
        mlflow.log_metrics({
            f"robust.{mode}.clean": result["clean_accuracy"][mode],
            f"robust.{mode}.mean_corruption_accuracy":
                result["corruptions"]["mean_corruption_accuracy"][mode],
            **{f"robust.{mode}.{attack}_{eps.replace('/', '_')}": by_mode[mode]
               for attack, table in result["adversarial"]["accuracy"].items()
               for eps, by_mode in table.items()}})
    mlflow.log_artifact(str(path))
    exact = result["nullspace"]["exact"]
    if "note" in exact:
        print(f"{name}: {exact['note']}")
    else:
        print(f"{name}: exact nullspace of dimension {exact['nullspace']['dimension']}: noise as "
              f"large as each image changes {exact['sequential']['predictions_changed']} "
              f"predictions, relative logit change at most "
              f"{exact['sequential']['relative_logit_change_max']:.2e}")
    synthesis = result["nullspace"]["synthesised"]["synthesis"]
    reached = "reached" if synthesis["converged"] else "warning: did NOT reach"
    print(f"{name}: approximate-nullspace noise {reached} epsilon in {synthesis['steps']} "
          f"steps (distance {synthesis['distance']:.4g} on "
          f"{synthesis['check_images']} training images; random noise of its norm "
          f"{synthesis['random_distance']:.3g})")
    adversarial = result["adversarial"]
    if adversarial["pgd_above_fgsm"]:
        print(f"warning: {name}: PGD scores above FGSM at {adversarial['pgd_above_fgsm']}: a sign "
              f"of gradient masking or a too-weak PGD (raise robustness.attacks.pgd_steps)")
    return metrics, outcomes
