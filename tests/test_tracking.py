"""MLflow grouping: the stage runs of one pipeline run share one parent, even when stages start
at the same moment (a DVC queue with several workers, two shells)."""
import subprocess
import sys
import time

from conftest import ROOT

RACER = """
import sys, time
sys.path.insert(0, {pipeline!r})
import _stage, mlflow
mlflow.set_tracking_uri({uri!r})
client = mlflow.MlflowClient()
while time.time() < {start}:  # all processes leave the starting line together
    time.sleep(0.001)
print(_stage._experiment_and_parent(client, "race", "pipeline-run-42", {{}})[1])
"""


def test_stages_starting_together_create_one_parent_run(tmp_path):
    import mlflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # create the store (its schema) up front
    start = time.time() + 8  # time enough for every process to import MLflow first
    racers = [subprocess.Popen([sys.executable, "-c", RACER.format(
        pipeline=str(ROOT / "pipeline"), uri=uri, start=start)], stdout=subprocess.PIPE,
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
