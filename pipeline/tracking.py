"""MLflow for the stages, in the stage's own process.

A stage opens its MLflow run before any compute (`pipeline.stage.track`), nested under the parent
run of its pipeline run (`experiment_and_parent`), and ends it before it exits.

ANYORDER_TRACKING=off switches MLflow off altogether, for a machine that has the library's
packages but not MLflow (a GPU box): the stages compute and write their outputs and metrics/ as
usual (what DVC tracks), and nothing goes to MLflow. `register`, whose output is MLflow's registry
(`register_export`), refuses to run then.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

OFF = "ANYORDER_TRACKING"


def tracking_off() -> bool:
    """ANYORDER_TRACKING=off (or 0, false, no): no MLflow at all (see the module doc)."""
    return os.environ.get(OFF, "").strip().lower() in ("off", "0", "false", "no")


class TrackingUnavailable(Exception):
    """The store could not be opened (the message is MLflow's: `Type: first line`)."""


class CallFailed(Exception):
    """An MLflow call failed (the message is MLflow's: `Type: first line`)."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


@contextmanager
def _project_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine working on this project."""
    path = root / ".anyorder" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def experiment_and_parent(client, name: str, group: str, tags: dict, root: Path
                          ) -> tuple[str, str]:
    """The experiment and the parent run of this pipeline run, each created once even when
    stages start together: the lookup-or-create runs under a project lock."""
    with _project_lock(root, "mlflow"):
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            name, (root / "mlartifacts").as_uri())
        found = client.search_runs([experiment_id], filter_string=(
            f"tags.`anyorder.pipeline_run_id` = '{group}' and tags.`anyorder.role` = 'pipeline'"),
            max_results=1)
        if found:
            return experiment_id, found[0].info.run_id
        parent = client.create_run(experiment_id, run_name=f"pipeline {group}", tags={
            **tags, "anyorder.pipeline_run_id": group, "anyorder.role": "pipeline"})
        client.set_terminated(parent.info.run_id)
        return experiment_id, parent.info.run_id


def open_run(mlflow, uri: str, experiment: str, group: str, tags: dict, stage: str,
             root: str) -> None:
    """Start the stage's MLflow run, nested under its pipeline run's parent run."""
    mlflow.set_tracking_uri(uri)
    experiment_id, parent_id = experiment_and_parent(
        mlflow.MlflowClient(), experiment, group, tags, Path(root))
    mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags={
        **tags, "anyorder.role": "stage", "anyorder.stage": stage,
        "mlflow.parentRunId": parent_id})


class Off:
    """No MLflow (ANYORDER_TRACKING=off): every call is accepted and dropped."""

    def open(self, **request: Any) -> None:
        print(f"MLflow off ({OFF}=off): {request.get('stage', 'this stage')} writes its outputs "
              f"and metrics as usual; nothing is logged to MLflow", file=sys.stderr, flush=True)

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


class InProcess:
    """MLflow in this process."""

    def open(self, **request: Any) -> None:
        try:
            import mlflow
            open_run(mlflow, **request)
        except Exception as exc:
            raise TrackingUnavailable(_describe(exc)) from exc

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        import mlflow
        try:
            getattr(mlflow, name)(*args, **kwargs)
        except Exception as exc:
            raise CallFailed(_describe(exc)) from exc


def backend():
    """Where this stage's MLflow calls go: MLflow in this process, or nowhere when it is off."""
    return Off() if tracking_off() else InProcess()


# -- the model registry: what the register stage writes -------------------------------------------

def model_signature(manifest: dict, params: dict):
    """Images in, logits / class / executed order out, and the runtime's inference params
    (`params`: name -> (MLflow param type, default), as anyorder.pyfunc.PARAMS)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    size = manifest["image_size"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, manifest["num_classes"]), "logits"),
                        TensorSpec(np.dtype(np.int64), (-1,), "class_index"),
                        TensorSpec(np.dtype(np.int64), (-1, -1), "executed_order")]),
        params=ParamSchema([ParamSpec(name, kind, default)
                            for name, (kind, default) in params.items()]))


def requirements() -> list[str]:
    """What the pyfunc imports at serving time, pinned (MLflow would spend seconds guessing).
    This package itself must be installed where the model is loaded (see the README)."""
    import numpy
    import onnxruntime
    return [f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def register_export(export_dir: Path, manifest: dict, loader_module: str, params: dict,
                    model_name: str, alias: str, verdict: dict, tags: dict) -> str:
    """Log `export_dir` (its manifest: `manifest`) as a pyfunc model run by `loader_module`
    (inference params: `params`) in the active MLflow run, register it as a new version of
    `model_name`, tag it, and point `alias` at it if `verdict` passed. Returns the version."""
    import mlflow
    import numpy as np

    size = manifest["image_size"]
    info = mlflow.pyfunc.log_model(
        name="model", loader_module=loader_module, data_path=str(export_dir),
        signature=model_signature(manifest, params),
        input_example=np.zeros((1, size, size, 3), np.uint8),
        pip_requirements=requirements(), registered_model_name=model_name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {"anyorder.export_version": manifest["version"], "anyorder.variant": manifest["variant"],
            "anyorder.gates": "passed" if verdict["passed"] else
            "failed: " + "; ".join(verdict["failed"]),
            **{f"metric.{name}": str(gate["value"]) for name, gate in verdict["gates"].items()},
            **tags}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if verdict["passed"]:
        client.set_registered_model_alias(model_name, alias, version)
    return version
