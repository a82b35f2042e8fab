"""Stage `register`: log the export named by register.export (ONNX graphs, manifest, and the
PyTorch checkpoint inside it) to MLflow as one pyfunc model that runs the order-agnostic runtime,
register it as a new version of register.model_name, tag it, and move the alias (champion) to it
only if every gate of register.gates passes; a failed gate registers the version, leaves the
alias where it was, and says why. Writes metrics/register.json."""
import os
import subprocess
from pathlib import Path

from _stage import (EXPORTS, METRICS, begin, fail, pipeline_run_id, read_json, require_mlflow,
                    track, user_errors)

from anyorder.files import atomic_write_json, sha256_file
from anyorder.evaluation.gates import check_gates
from anyorder.export.runtime import MANIFEST, read_manifest

PYFUNC_LOADER = "anyorder.pyfunc"


def signature(manifest: dict):
    """Images in, logits / class / executed order out, and the runtime's inference params."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    from anyorder.pyfunc import PARAMS

    size = manifest["image_size"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, manifest["num_classes"]), "logits"),
                        TensorSpec(np.dtype(np.int64), (-1,), "class_index"),
                        TensorSpec(np.dtype(np.int64), (-1, -1), "executed_order")]),
        params=ParamSchema([ParamSpec(name, kind, default)
                            for name, (kind, default) in PARAMS.items()]))


def requirements() -> list[str]:
    """What the pyfunc imports at serving time, pinned (MLflow would spend seconds guessing).
    This package itself must be installed where the model is loaded (see the README)."""
    import numpy
    import onnxruntime
    return [f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def register_export(export_dir: Path, model_name: str, alias: str, verdict: dict,
                    tags: dict) -> str:
    """Log `export_dir` as a pyfunc model in the active MLflow run, register it as a new version
    of `model_name`, tag it, and point `alias` at it if `verdict` passed. Returns the version."""
    import mlflow
    import numpy as np

    manifest = read_manifest(export_dir)
    size = manifest["image_size"]
    info = mlflow.pyfunc.log_model(
        name="model", loader_module=PYFUNC_LOADER, data_path=str(export_dir),
        signature=signature(manifest), input_example=np.zeros((1, size, size, 3), np.uint8),
        pip_requirements=requirements(), registered_model_name=model_name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {"anyorder.export_version": manifest["version"], "anyorder.variant": manifest["variant"],
            "anyorder.manifest_sha256": sha256_file(Path(export_dir) / MANIFEST),
            "anyorder.gates": "passed" if verdict["passed"] else
            "failed: " + "; ".join(verdict["failed"]),
            **{f"metric.{name}": str(gate["value"]) for name, gate in verdict["gates"].items()},
            **tags}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if verdict["passed"]:
        client.set_registered_model_alias(model_name, alias, version)
    return version


def main() -> None:
    stage = begin(__doc__, "register")
    require_mlflow(stage)  # the registry is MLflow's: nothing to do with MLflow off
    cfg = stage.settings.register
    export_dir = EXPORTS / cfg.export
    with user_errors():
        manifest = read_manifest(export_dir)
        export_check = read_json(METRICS / "export" / f"{cfg.export}.json", "export")
    verdict = check_gates(cfg.gates, manifest, export_check)
    tags = {"anyorder.export": cfg.export, "git.commit": git_commit(),
            "anyorder.pipeline_run_id": pipeline_run_id(stage.params_path)}
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    # In-process MLflow: the model is logged into this stage's run (not by a helper process).
    with track(stage, in_process=True) as tracker:
        import mlflow

        try:  # the registry is this stage's output: failing to write it fails the stage
            version = register_export(export_dir, cfg.model_name, cfg.alias, verdict, tags)
        except mlflow.exceptions.MlflowException as exc:
            fail(f"register: the MLflow registry refused the model ({exc}); nothing was "
                 f"registered", code=1)
        tracker.log_metrics({f"gate.{name}": float(gate["passed"])
                             for name, gate in verdict["gates"].items()})
        atomic_write_json(METRICS / "register.json", {
            "model_name": cfg.model_name, "export": cfg.export,
            "export_version": manifest["version"], "alias": cfg.alias,
            "alias_moved": verdict["passed"], **verdict})
    where = f"models:/{cfg.model_name}/{version}"
    if verdict["passed"]:
        print(f"register: {where} is now models:/{cfg.model_name}@{cfg.alias}")
    else:
        print(f"register: {where} registered, alias {cfg.alias!r} left where it was; gates "
              f"failed: {'; '.join(verdict['failed'])}")


if __name__ == "__main__":
    main()
