"""MLflow grouping: the stage runs of one pipeline run share one parent, even when stages start
at the same moment (a DVC queue with several workers, two shells)."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, copy_tiny_project

RACER = """
import sys, time
sys.path.insert(0, {project!r})
import mlflow
from pathlib import Path
from pipeline import tracking
mlflow.set_tracking_uri({uri!r})
client = mlflow.MlflowClient()
while time.time() < {start}:  # all processes leave the starting line together
    time.sleep(0.001)
print(tracking.experiment_and_parent(client, "race", "pipeline-run-42", {{}}, Path({root!r}))[1])
"""


@pytest.mark.slow
def test_stages_starting_together_create_one_parent_run(tmp_path):
    import mlflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # create the store (its schema) up front
    start = time.time() + 8  # time enough for every process to import MLflow first
    racers = [subprocess.Popen([sys.executable, "-c", RACER.format(
        project=str(ROOT), uri=uri, start=start,
        root=str(tmp_path))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in outputs]
    parents = {out.strip() for out, _ in outputs}
    assert len(parents) == 1
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("race")
    found = client.search_runs([experiment.experiment_id],
                               "tags.`anyorder.pipeline_run_id` = 'pipeline-run-42'")
    assert [run.info.run_id for run in found] == list(parents)


# -- a stage's run ---------------------------------------------------------------------------------

def run_prepare(root, run_id: str):
    environ = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "ANYORDER_PIPELINE_RUN_ID": run_id}
    proc = subprocess.run([sys.executable, "-m", "pipeline.stages.prepare"], cwd=root, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def stage_runs(root, run_id: str):
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("anyorder")
    return client, client.search_runs([experiment.experiment_id], (
        f"tags.`anyorder.pipeline_run_id` = '{run_id}' and tags.`anyorder.role` = 'stage'"))


def test_a_stage_records_its_params_and_metrics_under_its_pipeline_runs_parent(tmp_path):
    root = copy_tiny_project(tmp_path / "p")
    run_prepare(root, "run-a")
    run_prepare(root, "run-b")
    client, [first] = stage_runs(root, "run-a")
    _, [second] = stage_runs(root, "run-b")
    assert first.info.status == "FINISHED" and first.data.tags["anyorder.stage"] == "prepare"
    assert first.data.params["data.split_seed"] == "0"
    assert first.data.metrics and first.data.metrics == second.data.metrics
    parent = client.get_run(first.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["anyorder.role"] == "pipeline"
    assert parent.data.tags["anyorder.pipeline_run_id"] == "run-a"
    assert second.data.tags["mlflow.parentRunId"] != parent.info.run_id


# -- MLflow off (ANYORDER_TRACKING=off): a machine with the library's packages but not MLflow ------

NO_MLFLOW = 'raise ImportError("no MLflow on this machine (test)")\n'


def test_with_tracking_off_a_stage_runs_where_mlflow_is_missing_and_register_refuses(tmp_path):
    root = copy_tiny_project(tmp_path / "p")
    (tmp_path / "fake" / "mlflow").mkdir(parents=True)
    (tmp_path / "fake" / "mlflow" / "__init__.py").write_text(NO_MLFLOW)
    environ = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    environ.pop("MLFLOW_TRACKING_URI", None)

    def stage(name, **env):
        return subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}"], cwd=root,
                              env={**environ, **env}, capture_output=True, text=True, timeout=300)

    # Without the switch, a missing MLflow stops the stage before it computes anything.
    refused = stage("prepare")
    assert refused.returncode == 2 and "cannot be used" in refused.stderr
    assert not (root / "data/prepared").exists()
    # With it, the stage writes its outputs as usual, and no MLflow store appears.
    off = stage("prepare", ANYORDER_TRACKING="off")
    assert off.returncode == 0, off.stderr
    assert "MLflow off (ANYORDER_TRACKING=off): prepare writes its outputs" in off.stderr
    assert (root / "data/prepared/meta.json").is_file()
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()
    # register's output is MLflow's registry: it refuses, naming the switch, before reading.
    register = stage("register", ANYORDER_TRACKING="off")
    assert register.returncode == 2
    assert "register writes into MLflow itself and MLflow is off (ANYORDER_TRACKING=off)" in \
        register.stderr
