"""The DVC pipeline end to end on a tiny configuration, in throw-away copies of the project.

One module fixture runs `dvc repro` once (the only full reproduction in the suite); tests that
only read use it as is, tests that change anything work on their own copy (`clone`), so no test
depends on another having run. The Prefect flow over the real pipeline runs here too, on a clone.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, copy_tiny_project
import test_flow
from test_flow import dvc_edges, run_flow, task_runs

harness = test_flow.harness  # the Prefect test harness, a fixture here too

BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
# What `dvc repro` writes and git tracks: must not change when nothing it depends on changed.
TRACKED_OUTPUTS = ("dvc.lock", "metrics", "plots")


def run(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(root, env, *args, check=True):
    return run([str(BIN / "dvc"), *args], root, env, check)


def environment(root: Path) -> dict:
    return {**os.environ, **GIT_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "ANYORDER_PIPELINE_RUN_ID": "test-run-1"}


def stages_that_ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def changed_stages(root, env) -> set[str]:
    return set(json.loads(dvc(root, env, "status", "--json").stdout))


def edit_params(root: Path, edit) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def snapshot(root: Path) -> dict[str, bytes]:
    files = {}
    for name in TRACKED_OUTPUTS:
        path = root / name
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            files[str(file.relative_to(root))] = file.read_bytes()
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with tiny params, its own git + DVC repo and MLflow store, after one
    `dvc repro`, committed."""
    root = copy_tiny_project(tmp_path_factory.mktemp("project") / "p")
    env = environment(root)
    run(["git", "init", "-q"], root, env)
    dvc(root, env, "init", "-q")
    dvc(root, env, "config", "core.analytics", "false")
    first = dvc(root, env, "repro")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project, reproduced"], root, env)
    return root, first


@pytest.fixture()
def clone(project, tmp_path):
    """A private copy of the reproduced project (git, DVC cache and all) for a test to change."""
    root = tmp_path / "p"
    shutil.copytree(project[0], root, symlinks=True)
    return root, environment(root)


def check_prepared_trained_and_evaluated(root: Path) -> None:
    """The prepared data, the pre-trained and fine-tuned models, their evaluations and the
    summary."""
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
    assert summary["baseline_run"] == "seq" and set(summary["runs"]) == {"seq", "ls", "ls1",
                                                                          "frank"}
    assert not list((root / ".anyorder/state").glob("*/*"))  # finished runs leave no state


def check_selected_exported_and_registered(root: Path) -> None:
    """The selected model, its export and its check, and its registration in MLflow."""
    selection = json.loads((root / "models/selected/ls_best/selection.json").read_text())
    assert selection["chosen"] == "ls" and selection["split"] == "val"
    manifest = json.loads((root / "exports/ls_best/manifest.json").read_text())
    assert manifest["depth"] == 3 and len(manifest["graphs"]["blocks"]) == 3
    assert manifest["accuracy"]["arbitrary"] == json.loads(
        (root / "metrics/evaluate/ls.json").read_text())["arbitrary"]
    check = json.loads((root / "metrics/export/ls_best.json").read_text())
    assert check["max_abs_error"] <= 1e-4
    assert check["runtime_test_accuracy"]["max_difference_points"] <= 0.2
    # One epoch on 16x16 digits is far below the gates: registered, alias not moved, and why.
    registered = json.loads((root / "metrics/register.json").read_text())
    assert registered["alias_moved"] is False and registered["failed"]
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name='anyorder-vit'")
    assert [v.version for v in versions] == [1] and not versions[0].aliases
    assert versions[0].tags["anyorder.gates"].startswith("failed: ")


def check_robustness_and_plots(root: Path) -> None:
    # Robustness: every fine-tuned model and every nullspace arm, LS ones in random orders too.
    corrupted = json.loads((root / "data/corrupted/manifest.json").read_text())
    assert corrupted["names"] == ["gaussian_noise", "fog"] and corrupted["severities"] == [1, 5]
    for name, modes in (("seq", ["sequential"]), ("ls", ["sequential", "random_orders"]),
                        ("seq_null", ["sequential"]), ("ls_plain", ["sequential", "random_orders"])):
        robust = json.loads((root / f"metrics/robustness/{name}.json").read_text())
        assert robust["modes"] == modes and robust["num_images_attacked_and_corrupted"] == 16
        assert set(robust["corruptions"]["per_corruption"]["fog"]) == {"1", "5"}
        assert robust["adversarial"]["max_perturbation_beyond_eps"] <= 1e-6
        exact = robust["nullspace"]["exact"]
        assert exact["nullspace"]["dimension"] == 48 - 16  # 3x4x4 inputs, width 16
        assert exact["sequential"]["predictions_changed"] == 0
    arm = json.loads((root / "models/nullspace/seq_null/model.json").read_text())["training"]
    assert arm["nullspace"]["noise"] == "nullspace" and arm["final"]["noise_converged"]
    assert arm["final"]["noise_distance"] < arm["nullspace"]["synthesis"]["epsilon"]
    table = json.loads((root / "metrics/robustness_summary.json").read_text())
    assert table["baseline"] == "seq" and set(table["models"]) == {"seq", "ls", "ls1", "seq_null",
                                                                    "ls_plain"}
    assert table["models"]["seq"]["sequential"]["mce_vs_baseline"] == pytest.approx(1.0)
    assert "| ls_plain | ls | random_orders |" in (root / "metrics/robustness.md").read_text()
    for plot in ("robustness/severity.png", "robustness/adversarial.png", "pruning/pruning.png",
                 "orders.png", "analysis/slot_contribution.png", "analysis/projection.png"):
        assert (root / "plots" / plot).read_bytes()[:4] == b"\x89PNG"


def check_layerdrop_merge_pruning_and_report(root: Path) -> None:
    # LayerDrop (on an LS run here): the recorded orders are shortened ones; the merge card;
    # the pruning curve of every evaluated model; the report page and its links.
    dropped = json.loads((root / "models/finetune/ls1/train_orders.json").read_text())
    assert dropped["layerdrop"] == [0.3] * 3 and min(map(len, dropped["orders"])) < 3
    card = json.loads((root / "models/merged/frank/merge.json").read_text())
    assert card["generator"] == "greedy" and set(card["sources"]) == {"ls", "ls1"}
    assert card["validation"]["merged"] >= card["validation"]["best_source"]
    assert all(len(s["sha256"]) == 64 for s in card["sources"].values())
    for name in ("seq", "ls", "ls1", "frank"):
        curve = json.loads((root / f"metrics/pruning/{name}.json").read_text())["curve"]
        assert [row["kept"] for row in curve] == [3, 2, 1]
    report = (root / "metrics/report.md").read_text()
    for section in ("## Models", "## Pruning", "## Frankenstein merges", "## Robustness",
                    "## Analysis"):
        assert section in report
    for link in [line.split("(")[1].rstrip(")") for line in report.splitlines()
                 if line.startswith("![")]:
        assert (root / "metrics" / link).resolve().is_file(), link


@pytest.mark.slow
def test_repro_writes_every_output(project):
    root, first = project
    assert "Running stage 'report'" in first.stdout
    check_prepared_trained_and_evaluated(root)
    check_selected_exported_and_registered(root)
    check_robustness_and_plots(root)
    check_layerdrop_merge_pruning_and_report(root)


@pytest.mark.slow
def test_stage_runs_are_grouped_in_mlflow(project):
    root, _ = project
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("anyorder")
    runs = client.search_runs([experiment.experiment_id],
                              "tags.`anyorder.pipeline_run_id` = 'test-run-1'")
    stages = {r.data.tags.get("anyorder.stage") for r in runs if r.data.tags["anyorder.role"] == "stage"}
    assert stages == {"prepare", "pretrain", "finetune@seq", "finetune@ls", "finetune@ls1",
                      "evaluate@seq", "evaluate@ls", "evaluate@ls1", "report", "select",
                      "export@ls_best", "register", "corrupt", "nullspace@seq_null",
                      "nullspace@ls_plain", "merge@frank", "analysis"}
    parents = [r for r in runs if r.data.tags["anyorder.role"] == "pipeline"]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in runs if r.data.tags["anyorder.role"] == "stage")
    evaluate = next(r for r in runs if r.data.tags.get("anyorder.stage") == "evaluate@ls")
    assert "test_accuracy_arbitrary_mean" in evaluate.data.metrics
    assert evaluate.data.params["evaluate.num_orders"] == "3"  # the declared params, logged
    pretrain = next(r for r in runs if r.data.tags.get("anyorder.stage") == "pretrain")
    assert client.get_metric_history(pretrain.info.run_id, "val_accuracy_sequential")
    assert "train_seconds" in pretrain.data.metrics  # timings live here, not in the outputs


@pytest.mark.slow
def test_forced_rerun_changes_no_tracked_file(clone):
    """Same inputs, same bytes: no timings or zip timestamps in anything DVC or git tracks. The
    stages forced cover every kind of output: prepared data, training (a plain and a LayerDrop
    run: histories, orders, checkpoints), corrupted sets, an export, the report and its plots."""
    root, env = clone
    before = snapshot(root)
    forced = dvc(root, env, "repro", "--force", "--single-item", "prepare", "pretrain",
                 "finetune@ls1", "corrupt", "export@ls_best", "report")
    assert stages_that_ran(forced.stdout) == {"prepare", "pretrain", "finetune@ls1", "corrupt",
                                              "export@ls_best", "report"}
    after = snapshot(root)
    assert after.keys() == before.keys()
    assert [name for name in before if before[name] != after[name]] == []
    assert changed_stages(root, env) == set()  # the DVC-cached outputs hash the same too


@pytest.mark.slow
def test_a_param_change_reruns_exactly_the_stages_that_read_it(clone):
    root, env = clone
    assert stages_that_ran(dvc(root, env, "repro").stdout) == set()
    edit_params(root, lambda p: p["evaluate"].update(num_orders=4))
    assert changed_stages(root, env) == {"evaluate@seq", "evaluate@ls", "evaluate@ls1",
                                         "merge@frank"}
    run(["git", "checkout", "params.yaml"], root, env)
    # A variant knob of one LS run touches that run only (not the baseline, not pretrain).
    edit_params(root, lambda p: p["finetune"]["runs"]["ls"].update(order_sampling="sample"))
    assert changed_stages(root, env) == {"finetune@ls", "report", "select"}


@pytest.mark.slow
def test_a_library_change_reruns_the_stages_that_import_it(clone):
    root, env = clone
    with open(root / "src/anyorder/model/checkpoint.py", "a") as f:
        f.write("\n# one more byte\n")
    assert changed_stages(root, env) == {"pretrain", "finetune@seq", "finetune@ls",
                                         "finetune@ls1", "evaluate@seq", "evaluate@ls",
                                         "evaluate@ls1", "select", "export@ls_best",
                                         "nullspace@seq_null", "nullspace@ls_plain",
                                         "merge@frank", "analysis"}
    run(["git", "checkout", "src/anyorder/model/checkpoint.py"], root, env)
    with open(root / "src/anyorder/report.py", "a") as f:
        f.write("\n# one more byte\n")
    assert changed_stages(root, env) == {"report"}


@pytest.mark.slow
def test_replacing_the_data_reruns_prepare_and_what_follows(clone):
    root, env = clone
    images = root.parent / "pets"  # outside the project: an external DVC dependency
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "emu"):
        (images / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                images / name / f"{i}.png")
    edit_params(root, lambda p: p["data"].update(source="imagefolder", path=str(images)))
    assert {"prepare"} <= changed_stages(root, env)
    dvc(root, env, "repro", "prepare")
    assert "prepare" not in changed_stages(root, env)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / "dog/new.png")
    assert "prepare" in changed_stages(root, env)  # one image more: the data changed
    dvc(root, env, "repro", "prepare")
    assert json.loads((root / "data/prepared/meta.json").read_text())["class_counts"]["train"][1] \
        > 0
    assert {"pretrain", "finetune@seq", "finetune@ls"} <= changed_stages(root, env)


@pytest.mark.slow
def test_dvc_exp_run_with_overrides_reruns_only_the_affected_stages(clone):
    root, env = clone
    exp = dvc(root, env, "exp", "run", "-S", "report.baseline=ls")
    assert stages_that_ran(exp.stdout) == {"report"}
    assert json.loads((root / "metrics/summary.json").read_text())["baseline_run"] == "ls"
    shown = json.loads(dvc(root, env, "exp", "show", "--json").stdout)
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    recorded = [run["revs"][0]["data"]["params"]["params.yaml"]["data"]["report"]["baseline"]
                for run in experiments]
    assert recorded == ["ls"]  # the experiment is recorded with the value it ran with


@pytest.mark.slow
def test_the_prefect_flow_runs_the_pipeline_as_a_dvc_experiment(harness, clone, monkeypatch):
    """The flow on the reproduced project with an override: every DVC stage a task, the stages
    the override touches rerun, a DVC experiment, params.yaml put back, and MLflow runs carrying
    the flow run id."""
    root, _ = clone
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)  # the clone's store, nobody else's
    state = run_flow(root, set_params=["report.baseline=ls"])
    assert state.is_completed(), state.message
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)

    # DVC: the override ran and was saved as an experiment; params.yaml is back as committed,
    # so the next plain run redoes what the override touched
    assert json.loads((root / "metrics/summary.json").read_text())["baseline_run"] == "ls"
    assert yaml.safe_load((root / "params.yaml").read_text())["report"]["baseline"] == "seq"
    assert changed_stages(root, environment(root)) == {"report"}
    exps = subprocess.run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], cwd=root,
                          capture_output=True, text=True, check=True).stdout.split()
    assert result["experiment"] in exps

    # Prefect: the MLflow artifact of the flow run (its task graph against DVC's is checked on
    # toy projects, tests/test_flow.py: task runs are recorded from events, which a worker that
    # ran other Prefect tests may send elsewhere)
    assert flow_run_id in task_runs(state, artifacts=True)["mlflow-runs"].data
    assert set(result["stages"]) == set(dvc_edges(root)[0])  # every DVC stage ran as a task

    # MLflow: the stage that ran, tagged with the flow run id and the DVC experiment
    import mlflow
    client = mlflow.MlflowClient(tracking)
    mlflow_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    stage_runs = {r.data.tags.get("anyorder.stage") for r in mlflow_runs
                  if r.data.tags.get("anyorder.role") == "stage"}
    assert stage_runs == {"report"}
    assert {r.info.run_id for r in mlflow_runs} == set(result["mlflow_runs"])
    assert all(r.data.tags["dvc.experiment"] == result["experiment"] for r in mlflow_runs)
    assert all(r.data.tags["anyorder.pipeline_run_id"] == flow_run_id for r in mlflow_runs)


def test_project_root_sees_through_dvc_temporary_experiments():
    from pipeline import stage as plumbing
    assert plumbing.project_root() == ROOT
    temporary = Path("/work/proj/.dvc/tmp/exps/tmpk3j2/pipeline/stage.py")
    assert plumbing.project_root(temporary) == Path("/work/proj")


@pytest.mark.slow
def test_bad_input_under_dvc_repro_fails_the_stage_and_dvc_checkout_restores(clone):
    """Under `dvc repro`, DVC removes a stage's outputs before its command runs: a refused
    stage leaves them absent (never half-written), and `dvc checkout` brings back the last
    good ones from DVC's cache."""
    root, env = clone
    # A missing data set DVC refuses itself (a missing dependency).
    edit_params(root, lambda p: p["data"].update(path="data/missing.npz"))
    failed = dvc(root, env, "repro", "prepare", check=False)
    assert failed.returncode != 0 and "data/missing.npz" in failed.stderr
    # One DVC cannot judge: images stored as floats. The stage refuses it with its message.
    np.savez(root / "data/floats.npz", x=np.zeros((30, 8, 8), np.float32), y=np.arange(30) % 3)
    edit_params(root, lambda p: p["data"].update(path="data/floats.npz"))
    failed = dvc(root, env, "repro", "prepare", check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "error: data/floats.npz: x has dtype float32, expected uint8" in output
    assert "Traceback" not in output
    assert not (root / "data/prepared").exists()  # removed by DVC before the command ran
    run(["git", "checkout", "params.yaml"], root, env)
    dvc(root, env, "checkout")
    assert (root / "data/prepared/meta.json").is_file()
    assert changed_stages(root, env) == set()
