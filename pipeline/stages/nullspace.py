"""Stage `nullspace@<arm>`: fine-tune a model against approximate-nullspace noise (spec section 2),
or one of its controls on the same schedule and seed, then evaluate its robustness.

Arms (nullspace.arms): a start model, a noise kind and a seed. "nullspace": every epoch a fresh
noise is synthesised from the current weights and the loss is CE(clean) + CE(noisy); "random":
the same, with un-optimised noise of the norm the synthesis reaches; "none": plain fine-tuning.
A LayerShuffle start model is fine-tuned (and its noise synthesised) under random block orders.
Writes models/nullspace/<arm>, plots/train/nullspace-<arm>.csv, metrics/robustness/<arm>.json
(with the synthesis of every epoch's noise: steps, distance, norm, converged) and
metrics/outcomes/<arm>.json (per-image outcomes for the report's intervals).
Training and evaluation share one process: on 2 cores a stage's start costs about 10 s.
"""
import json

from pipeline.outputs import train_and_log, write, write_robustness
from pipeline.stage import (METRICS, NULLSPACE, PLOTS, PREPARED, begin, load_corrupted,
                            require_model, user_errors)

from anyorder.config import model_dir
from anyorder.data.prepared import load_split
from anyorder.device import resolve_device
from anyorder.evaluation.intervals import pack_tree
from anyorder.model.checkpoint import load_model, training_record
from anyorder.robustness.nullspace import epoch_noise
from anyorder.robustness.record import arm_recipe, robustness_record, synthesis_per_epoch
from anyorder.training.loop import train_and_save


def main() -> None:
    stage = begin(__doc__, "nullspace", foreach="arm")
    arm_name, cfg = stage.args.arm, stage.settings.nullspace
    arm = cfg.arms[arm_name]
    with user_errors():
        device = resolve_device(cfg.train.device, "nullspace.train.device")
        robustness_device = resolve_device(stage.settings.robustness.device, "robustness.device")
        start_dir = str(model_dir(stage.settings, arm.start))
        require_model(start_dir, f"nullspace.arms.{arm_name}.start: {arm.start} ({start_dir})")
        corrupted = load_corrupted(stage.settings)
        train_images, _ = load_split(PREPARED, "train")
    model, start = load_model(start_dir), load_model(start_dir)  # start: kept as it was
    recipe = arm_recipe(arm_name, start_dir, arm.noise, cfg.synthesis)
    trained = training_record(start_dir).get("config", {})
    epochs = {"fine_tune_epochs": f"{trained.get('epochs', '?')}+{cfg.train.epochs}"}

    def evaluate(mlflow, history) -> None:
        metrics, outcomes = robustness_record(
            stage.settings.robustness, model, arm_name, load_split(PREPARED, "test"), train_images,
            corrupted, robustness_device, start, synthesis_per_epoch(history), epochs)
        write_robustness(mlflow, metrics)
        write(METRICS / "outcomes" / f"{arm_name}.json", pack_tree({"robustness": outcomes}))

    train_and_log(stage, train_and_save, model, cfg.train, arm.seed, NULLSPACE / arm_name,
                  PLOTS / "train" / f"nullspace-{arm_name}.csv", info={"nullspace": recipe},
                  epoch_noise=epoch_noise(arm.noise, cfg.synthesis, train_images, device),
                  fingerprint_extra=json.dumps(recipe, sort_keys=True), then=evaluate)


if __name__ == "__main__":
    main()
