"""What the two training stages (pretrain, finetune@run) share: train with the library, log to
MLflow, write the plot. Kept out of _stage.py so that stages that train nothing do not depend on
the training code."""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

from _stage import (PREPARED, STAGE_ARGV, Stage, fail, inputs_digest, project_root,
                    track)

from anyorder.training import distributed
from anyorder.threads import cores_per_process
from anyorder.files import atomic_write_csv
from anyorder.errors import RunFailed
from anyorder.training.loop import train_and_save

# Resumable training state: outside DVC's outputs (DVC deletes those before a stage runs), and
# at the real project root so that it survives `dvc exp run --temp` and the experiment queue.
STATE = project_root() / ".anyorder" / "state"


def relaunch_under_torchrun(nproc: int) -> None:
    """With `nproc` > 1 and not yet under torchrun: become torchrun running this same stage
    command in `nproc` processes (DDP, one machine; rank 0 does what this process would have).
    Each process gets an equal share of the cores."""
    if nproc <= 1 or distributed.from_env().active:
        return
    # Set here, or torchrun sets 1; compute.threads 0 then takes it (compute.threads_for).
    os.environ.setdefault("OMP_NUM_THREADS", str(cores_per_process(nproc)))
    # The stage's own arguments travel in the environment: torchrun would read `--run` after
    # the script name as an abbreviation of its own `--run-path`.
    os.environ[STAGE_ARGV] = json.dumps(sys.argv[1:])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), sys.argv[0]]
    print(f"launching {nproc} processes: {' '.join(command[1:])}", flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, command)


class _NoTracking:
    """What a rank other than 0 logs to MLflow: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def train_and_log(stage: Stage, model, cfg, seed: int, out_dir: Path, plot_csv: Path,
                  order_sampling: str = "batch", position_loss_weight: float = 1.0,
                  epoch_noise=None, info: Optional[dict] = None, fingerprint_extra: str = "",
                  then: Optional[Callable] = None, layerdrop: Optional[list] = None) -> None:
    """Train and save with the library (resumable under STATE/<stage>), write the per-epoch plot
    CSV, mirror it all to MLflow (timings there and in the log, never in the outputs).
    `then(mlflow, history)` runs after saving, inside the same MLflow run (an evaluation of the
    model; history: the per-epoch records).
    With cfg.nproc > 1 the stage first relaunches itself under torchrun; only rank 0 logs,
    writes and evaluates."""
    relaunch_under_torchrun(cfg.nproc)
    main = distributed.from_env().main
    with (track(stage) if main else nullcontext(_NoTracking())) as mlflow:
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
        except RunFailed as exc:
            fail(f"{stage.name}: {exc}", code=1)
        if not main:
            return
        atomic_write_csv(plot_csv, result.history)
        mlflow.log_metrics({"train_seconds": sum(result.epoch_seconds),
                            "resumed_from_epoch": result.resumed_from_epoch})
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
        if then is not None:
            then(mlflow, result.history)
    # Saved: no state of this stage is worth resuming any more, also none left by a run with
    # other settings that was killed.
    shutil.rmtree(STATE / stage.name, ignore_errors=True)
    final = result.history[-1]
    print(f"{stage.name}: val accuracy {final['val_accuracy_sequential']:.4f} sequential, "
          f"{final['val_accuracy_shuffled']:.4f} shuffled -> {out_dir}")
