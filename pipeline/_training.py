"""What the two training stages (pretrain, finetune@run) share: train with the library, log to
MLflow, write the plot. Kept out of _stage.py so that stages that train nothing do not depend on
the training code."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from _stage import PREPARED, Stage, fail, inputs_digest, project_root, track

from anyorder.files import atomic_write_csv
from anyorder.train import TrainingDiverged, train_and_save

# Resumable training state: outside DVC's outputs (DVC deletes those before a stage runs), and
# at the real project root so that it survives `dvc exp run --temp` and the experiment queue.
STATE = project_root() / ".anyorder" / "state"


def train_and_log(stage: Stage, model, cfg, seed: int, out_dir: Path, plot_csv: Path,
                  order_sampling: str = "batch", position_loss_weight: float = 1.0,
                  epoch_noise=None, info: Optional[dict] = None, fingerprint_extra: str = "",
                  then: Optional[Callable] = None, layerdrop: Optional[list] = None) -> None:
    """Train and save with the library (resumable under STATE/<stage>), write the per-epoch plot
    CSV, mirror it all to MLflow (timings there and in the log, never in the outputs).
    `then(mlflow)` runs after saving, inside the same MLflow run (an evaluation of the model)."""
    with track(stage) as mlflow:
        def log_epoch(epoch: int, record: dict, seconds: float) -> None:
            mlflow.log_metrics({**{k: v for k, v in record.items() if k != "epoch"},
                                "epoch_seconds": seconds}, step=epoch)

        try:
            result = train_and_save(model, PREPARED, cfg, seed, out_dir, STATE / stage.name,
                                    order_sampling=order_sampling,
                                    position_loss_weight=position_loss_weight,
                                    fingerprint_extra=inputs_digest(stage) + fingerprint_extra,
                                    on_epoch_end=log_epoch, epoch_noise=epoch_noise, info=info,
                                    layerdrop=layerdrop)
        except TrainingDiverged as exc:
            fail(f"{stage.name}: {exc}", code=1)
        atomic_write_csv(plot_csv, result.history)
        mlflow.log_metrics({"train_seconds": sum(result.epoch_seconds),
                            "resumed_from_epoch": result.resumed_from_epoch})
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
        if then is not None:
            then(mlflow)
    # Saved: no state of this stage is worth resuming any more, also none left by a run with
    # other settings that was killed.
    shutil.rmtree(STATE / stage.name, ignore_errors=True)
    final = result.history[-1]
    print(f"{stage.name}: val accuracy {final['val_accuracy_sequential']:.4f} sequential, "
          f"{final['val_accuracy_shuffled']:.4f} shuffled -> {out_dir}")
