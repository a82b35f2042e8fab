"""The DVC pipeline end to end on a tiny configuration, in a throw-away copy of the project."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_tiny_project

BIN = Path(sys.executable).parent

def run(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with tiny params, its own git + DVC repo and its own MLflow store."""
    root = copy_tiny_project(tmp_path_factory.mktemp("project"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "ANYORDER_PIPELINE_RUN_ID": "test-run-1", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q"], root, env)
    run([str(BIN / "dvc"), "init", "-q"], root, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], root, env)
    first = run([str(BIN / "dvc"), "repro"], root, env)
    return root, env, first


@pytest.mark.slow
def test_repro_writes_every_output(project):
    root, _, first = project
    assert "Running stage 'report'" in first.stdout
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["counts"]["test"] > 0
    for model_dir in ("models/pretrain", "models/finetune/seq", "models/finetune/ls"):
        assert (root / model_dir / "model.safetensors").is_file()
        assert json.loads((root / model_dir / "model.json").read_text())["spec"]["depth"] == 3
    orders = json.loads((root / "models/finetune/ls/train_orders.json").read_text())
    assert len(orders["orders"]) > 0 and sorted(orders["orders"][0]) == [0, 1, 2]
    for name in ("seq", "ls"):
        metrics = json.loads((root / f"metrics/evaluate/{name}.json").read_text())
        assert set(metrics["arbitrary"]) >= {"mean", "std", "min", "max", "count"}
        assert len(metrics["orders"]) == 3 == len(metrics["order_accuracies"])
        assert (root / f"plots/orders/{name}.csv").read_text().startswith("order_index,accuracy")
    summary = json.loads((root / "metrics/summary.json").read_text())
    assert summary["baseline_run"] == "seq" and set(summary["runs"]) == {"seq", "ls"}
    assert not (root / ".anyorder/state/pretrain").exists()  # finished runs leave no state


@pytest.mark.slow
def test_stage_runs_are_grouped_in_mlflow(project):
    root, env, _ = project
    import mlflow
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("anyorder")
    runs = client.search_runs([experiment.experiment_id],
                              "tags.`anyorder.pipeline_run_id` = 'test-run-1'")
    stages = {r.data.tags.get("anyorder.stage") for r in runs if r.data.tags["anyorder.role"] == "stage"}
    assert stages == {"prepare", "pretrain", "finetune@seq", "finetune@ls", "evaluate@seq",
                      "evaluate@ls", "report"}
    parents = [r for r in runs if r.data.tags["anyorder.role"] == "pipeline"]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in runs if r.data.tags["anyorder.role"] == "stage")
    evaluate = next(r for r in runs if r.data.tags.get("anyorder.stage") == "evaluate@ls")
    assert "test_accuracy_arbitrary_mean" in evaluate.data.metrics
    pretrain = next(r for r in runs if r.data.tags.get("anyorder.stage") == "pretrain")
    assert client.get_metric_history(pretrain.info.run_id, "val_accuracy_sequential")


@pytest.mark.slow
def test_repro_reruns_exactly_what_changed(project):
    root, env, _ = project
    again = run([str(BIN / "dvc"), "repro"], root, env)
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["num_orders"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run([str(BIN / "dvc"), "status", "--json"], root, env)
    assert set(json.loads(status.stdout)) == {"evaluate@seq", "evaluate@ls"}


@pytest.mark.slow
def test_dvc_exp_run_with_overrides_reruns_only_the_affected_stages(project):
    root, env, _ = project
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project"], root, env)
    exp = run([str(BIN / "dvc"), "exp", "run", "-S", "evaluate.num_orders=5"], root, env)
    ran = {line.split("'")[1] for line in exp.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate@seq", "evaluate@ls", "report"}
    metrics = json.loads((root / "metrics/evaluate/ls.json").read_text())
    assert metrics["arbitrary"]["count"] == 5
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], root, env).stdout)
    assert "5" in json.dumps(shown)  # the experiment is recorded with its parameter


def test_project_root_sees_through_dvc_temporary_experiments():
    sys.path.insert(0, str(ROOT / "pipeline"))
    import _stage
    assert _stage.project_root() == ROOT
    temporary = Path("/work/proj/.dvc/tmp/exps/tmpk3j2/pipeline/_stage.py")
    assert _stage.project_root(temporary) == Path("/work/proj")


def test_a_bad_parameter_stops_a_stage_before_any_compute(tmp_path):
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["model"]["patch_size"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline/prepare.py"), "--params",
                           "params.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.patch_size: must divide data.image_size=32" in proc.stderr
    assert not (tmp_path / "data").exists()
