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
from dataclasses import asdict
from pathlib import Path

from _robustness import evaluate_and_write, load_corrupted, synthesis_per_epoch
from _stage import METRICS, NULLSPACE, PLOTS, PREPARED, begin, fail, user_errors
from _training import train_and_log

from anyorder.model.checkpoint import SPEC, load_model
from anyorder.data.prepared import load_split
from anyorder.files import atomic_write_json
from anyorder.evaluation.intervals import pack_tree
from anyorder.robustness.nullspace import epoch_noise
from anyorder.device import resolve_device


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
        synthesis = stage.settings.nullspace.synthesis
        load_corrupted(stage.settings)
        train_images, _ = load_split(PREPARED, "train")
    model = load_model(arm.start)
    start = load_model(arm.start)  # kept as it was, for the before/after comparison
    noise = epoch_noise(arm.noise, synthesis, train_images, device)
    recipe = {"arm": arm_name, "start": arm.start, "noise": arm.noise,
              "synthesis": asdict(synthesis)}
    trained = json.loads((Path(arm.start) / SPEC).read_text()).get("training", {})
    start_epochs = trained.get("config", {}).get("epochs", "?")  # "?": a start trained elsewhere

    def evaluate(mlflow, history) -> None:
        _, outcomes = evaluate_and_write(
            stage.settings, model, arm_name, robustness_device, mlflow, start=start,
            training_synthesis=synthesis_per_epoch(history),
            extra={"fine_tune_epochs": f"{start_epochs}+{cfg.epochs}"})
        atomic_write_json(METRICS / "outcomes" / f"{arm_name}.json",
                          pack_tree({"robustness": outcomes}))

    train_and_log(stage, model, cfg.training(), arm.seed, NULLSPACE / arm_name,
                  PLOTS / "train" / f"nullspace-{arm_name}.csv", epoch_noise=noise,
                  info={"nullspace": recipe}, fingerprint_extra=json.dumps(recipe, sort_keys=True),
                  then=evaluate)

if __name__ == "__main__":
    main()
