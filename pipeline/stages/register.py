"""Stage `register`: log the export named by register.export (ONNX graphs, manifest, and the
PyTorch checkpoint inside it) to MLflow as one pyfunc model that runs the order-agnostic runtime,
register it as a new version of register.model_name, tag it, and move the alias (champion) to it
only if every gate of register.gates passes; a failed gate registers the version, leaves the
alias where it was, and says why. Writes metrics/register.json."""
import os

from pipeline.stage import (EXPORTS, METRICS, begin, fail, pipeline_run_id, read_json,
                            require_mlflow, track, user_errors)
from pipeline.tracking import git_commit, register_export

from anyorder.evaluation.gates import check_gates
from anyorder.export.runtime import MANIFEST, read_manifest
from anyorder.files import atomic_write_json, sha256_file
from anyorder.pyfunc import PARAMS

PYFUNC_LOADER = "anyorder.pyfunc"


def main() -> None:
    stage = begin(__doc__, "register")
    require_mlflow(stage)  # the registry is MLflow's: nothing to do with MLflow off
    cfg = stage.settings.register
    export_dir = EXPORTS / cfg.export
    with user_errors():
        manifest = read_manifest(export_dir)
        export_check = read_json(METRICS / "export" / f"{cfg.export}.json", "export")
    verdict = check_gates(cfg.gates, manifest, export_check)
    tags = {"anyorder.manifest_sha256": sha256_file(export_dir / MANIFEST),
            "anyorder.export": cfg.export, "git.commit": git_commit(),
            "anyorder.pipeline_run_id": pipeline_run_id(stage.params_path)}
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    with track(stage, writes_mlflow=True) as tracker:
        import mlflow

        try:  # the registry is this stage's output: failing to write it fails the stage
            version = register_export(export_dir, manifest, PYFUNC_LOADER, PARAMS,
                                      cfg.model_name, cfg.alias, verdict, tags)
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
