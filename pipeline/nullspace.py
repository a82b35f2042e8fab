"""Stage `nullspace@<arm>`: fine-tune a model against approximate-nullspace noise (spec section 2),
or one of its controls on the same schedule and seed, then evaluate its robustness.

Arms (nullspace.arms): a start model, a noise kind and a seed. "nullspace": every epoch a fresh
noise is synthesised from the current weights and the loss is CE(clean) + CE(noisy); "random":
the same, with un-optimised noise of the norm the synthesis reaches; "none": plain fine-tuning.
A LayerShuffle start model is fine-tuned (and its noise synthesised) under random block orders.
Writes models/nullspace/<arm>, plots/train/nullspace-<arm>.csv, metrics/robustness/<arm>.json.
Training and evaluation share one process: on 2 cores a stage's start costs about 10 s.
"""
import json
from dataclasses import asdict
from pathlib import Path

from _robustness import evaluate_and_write, load_corrupted, synthesis_settings
from _stage import NULLSPACE, PLOTS, PREPARED, begin, fail, user_errors
from _training import train_and_log

from anyorder.checkpoint import load_model
from anyorder.data import load_split
from anyorder.nullspace import epoch_noise
from anyorder.tensors import resolve_device


def main() -> None:
    stage = begin(__doc__, "nullspace", foreach="arm")
    arm_name = stage.args.arm
    cfg = stage.settings.nullspace
    arm = cfg.arms[arm_name]
    with user_errors():
        device = resolve_device(cfg.device, "nullspace.device")
        robustness_device = resolve_device(stage.settings.robustness.device, "robustness.device")
        if not (Path(arm.start) / "model.json").is_file():
            fail(f"nullspace.arms.{arm_name}.start: {arm.start} holds no model (model.json); "
                 f"name a model directory the pipeline writes, e.g. models/finetune/sequential")
        synthesis = synthesis_settings(stage.settings)
        load_corrupted(stage.settings)
        train_images, _ = load_split(PREPARED, "train")
    model = load_model(arm.start)
    start = load_model(arm.start)  # kept as it was, for the before/after comparison
    noise = epoch_noise(arm.noise, synthesis, train_images, device)
    recipe = {"arm": arm_name, "start": arm.start, "noise": arm.noise,
              "synthesis": asdict(synthesis)}
    train_and_log(stage, model, cfg.training(), arm.seed, NULLSPACE / arm_name,
                  PLOTS / "train" / f"nullspace-{arm_name}.csv", epoch_noise=noise,
                  info={"nullspace": recipe}, fingerprint_extra=json.dumps(recipe, sort_keys=True),
                  then=lambda mlflow, history: evaluate_and_write(
                      stage.settings, model, arm_name, robustness_device, mlflow, start=start,
                      training_synthesis=synthesis_per_epoch(history)))


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

if __name__ == "__main__":
    main()
