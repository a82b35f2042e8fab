"""MLflow for the stages, off the critical path.

Importing MLflow and opening its store costs a stage about 3.5 s of one core (2 s of imports,
1.5 s for the SQLite store), and a stage that also imports torch and timm (5 s, one core) pays
both in a row. Measured on the whole default pipeline (every stage rerun, 2 cores), the helper
below saves 30 s of 13 min 7 s (3.8%; docs/pipeline.md). So a stage started by DVC hands
MLflow to a helper process started the moment the stage imports `pipeline.stage`: the helper
imports MLflow on the second core while the stage imports torch, then runs the stage's MLflow
calls, sent as JSON lines over its stdin, one at a time and answered in order (a failing call
fails in the stage as it would in-process). The stage opens its run before any compute as
before, and ends it before it exits; if the stage dies, the helper reads the end of its input and
exits.

`start_early()` starts the helper only when this process is a stage's entry point (a module of
pipeline/stages that a dvc.yaml command runs); anywhere else (tests, the Prefect flow, a stage
that must use MLflow in-process, like `register` that logs a model into its run) the calls go to
MLflow in this process: `backend(in_process)` picks. ANYORDER_MLFLOW_HELPER=0 switches the
helper off.

ANYORDER_TRACKING=off switches MLflow off altogether, for a machine that has the library's
packages but not MLflow (a lent GPU box): the stages compute and write their outputs and metrics/
as usual (what DVC tracks), and nothing goes to MLflow. `register`, whose output is MLflow's
registry (`register_export`), refuses to run then.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

PIPELINE = Path(__file__).resolve().parent
SWITCH = "ANYORDER_MLFLOW_HELPER"
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

    def close(self) -> None:
        pass


class InProcess:
    """MLflow in this process."""

    def open(self, **request: Any) -> None:
        import mlflow
        try:
            open_run(mlflow, **request)
        except Exception as exc:
            raise TrackingUnavailable(_describe(exc)) from exc

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        import mlflow
        try:
            getattr(mlflow, name)(*args, **kwargs)
        except Exception as exc:
            raise CallFailed(_describe(exc)) from exc

    def close(self) -> None:
        pass


def _plain(value: Any) -> Any:
    """JSON for what stages log besides str/int/float/dict/list: numpy values and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot send a {type(value).__name__} to the MLflow helper")


class Helper:
    """The MLflow helper process, seen from the stage."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls) -> "Helper":
        return cls(subprocess.Popen([sys.executable, str(Path(__file__).resolve())],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

    def _ask(self, message: dict) -> Optional[str]:
        """Send one request; None when it succeeded, else the helper's `Type: message`."""
        try:
            text = json.dumps(message, default=_plain)
        except (TypeError, ValueError) as exc:
            return _describe(exc)
        try:
            self.process.stdin.write(text + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            return f"MLflow helper process gone ({_describe(exc)})"
        if not line:
            return f"MLflow helper process exited (code {self.process.wait()})"
        reply = json.loads(line)
        return None if reply["ok"] else reply["error"]

    def open(self, **request: Any) -> None:
        error = self._ask({"op": "open", **request})
        if error:
            raise TrackingUnavailable(error)

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        error = self._ask({"op": "call", "name": name, "args": list(args), "kwargs": kwargs})
        if error:
            raise CallFailed(error)

    def close(self) -> None:
        """Let the helper finish (its input ends) and wait for it; a later run of this process
        uses MLflow in-process."""
        global _helper
        if _helper is self:
            _helper = None
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_helper: Optional[Helper] = None


def _stage_scripts(root: Path) -> set[str]:
    """The stage scripts dvc.yaml's commands run (`python -m pipeline.stages.<stage> ...`), by
    file name."""
    import re
    try:
        text = (root / "dvc.yaml").read_text()
    except OSError:
        return set()
    return {f"{name}.py" for name in re.findall(r"python\s+-m\s+pipeline\.stages\.(\w+)", text)}


def start_early(root: Path) -> None:
    """Start the helper if this process is a stage's entry point (see the module doc), rank 0 of
    a torchrun launch included and the other ranks not (they never track)."""
    global _helper
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if (_helper is not None or os.environ.get(SWITCH, "1") == "0" or tracking_off()
            or os.environ.get("RANK", "0") != "0" or script is None
            or script.parent != PIPELINE / "stages" or script.name not in _stage_scripts(root)):
        return
    _helper = Helper.start()


def backend(in_process: bool = False):
    """Where this stage's MLflow calls go: the helper if one was started (and the stage does not
    ask for MLflow in-process; a helper not wanted is let go), else this process."""
    if _helper is not None and in_process:
        _helper.close()
    if tracking_off():
        return Off()
    return _helper or InProcess()


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


def serve() -> None:
    """The helper: MLflow's calls from stdin, a JSON answer per call on stdout."""
    from pipeline.orchestration.processes import die_with_parent
    die_with_parent()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever MLflow prints goes to the stage's log, not into the answers
    import mlflow
    try:  # the SQLite store's code, loaded before the stage asks for it (harmless otherwise)
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except Exception:
        pass
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request.pop("op") == "open":
                open_run(mlflow, **request)
            else:
                getattr(mlflow, request["name"])(*request["args"], **request["kwargs"])
            answer: dict = {"ok": True}
        except Exception as exc:
            answer = {"ok": False, "error": _describe(exc)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    sys.path.insert(0, str(PIPELINE.parent))  # run as a file: the package `pipeline` beside it
    serve()
