"""The Prefect flow over the DVC pipeline (pipeline/orchestration/flow.py).

Tests run the flow on toy DVC projects made in tmp_path (stages are tiny python scripts); the
flow over the real pipeline runs in test_pipeline.py, on its reproduced tiny project. One Prefect test
harness (a temporary SQLite server, ~15 s to start) is shared by the whole session. The schedule
and command-line checks, which need no server, are in test_flow_settings.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from anyorder.settings import ConfigError
from conftest import ROOT, shipped_params
from pipeline.orchestration import dvc_graph  # the quiet environment applied (conftest)
from pipeline.orchestration import flow as pflow
from pipeline.orchestration import workspace

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}

STEP = """\
import sys
out, *deps = sys.argv[1:]
text = "".join(open(d).read() for d in deps) + out + "\\n"
open(out, "w").write(text)
"""
FLAKY = """\
import os, sys
marker = sys.argv[2]
attempts = int(open(marker).read()) + 1 if os.path.exists(marker) else 1
open(marker, "w").write(str(attempts))
if attempts == 1:
    sys.exit("transient failure on attempt 1")
open(sys.argv[1], "w").write("ok")
"""
PARAMS = "# toy parameters (the shipped ones, two toy runs of one epoch)\n" + yaml.safe_dump(
    shipped_params({"pretrain": {"train": {"epochs": 1, "warmup_epochs": 0}},
                    "finetune": {"train": {"epochs": 1},
                                 "runs": {"a": {"variant": "ls", "seed": 0},
                                          "b": {"variant": "sequential", "seed": 1}}},
                    "nullspace": {"arms": {"a_null": {"start": "a", "noise": "nullspace",
                                                      "seed": 0}}, "study_arms": {}},
                    "merge": {"models": {}}, "analysis": {"models": ["a", "b"]},
                    "export": {"models": ["ls_best"]},
                    "report": {"baseline": "b"}}), sort_keys=False)
SLEEPER = """\
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(300)
"""
BROKEN = """\
import sys
open(sys.argv[1], "w").write("half")  # a half-written output, then a crash
print("about to fail", flush=True)
raise RuntimeError("boom: the stage broke")
"""


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                   env={**os.environ, **GIT_ENV})


def make_project(root: Path, extra: dict | None = None, chain: bool = True) -> Path:
    """A git + DVC project: prepare -> pretrain -> finetune@{a,b} (foreach) -> report."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in {"step.py": STEP, "flaky.py": FLAKY, "broken.py": BROKEN,
                       "sleeper.py": SLEEPER}.items():
        (root / name).write_text(text)
    (root / "params.yaml").write_text(PARAMS)
    stages: dict = {"prepare": {"cmd": "python step.py data.txt", "deps": ["step.py"],
                                "outs": ["data.txt"]}}
    if chain:
        stages.update({
            "pretrain": {"cmd": "python step.py pre.txt data.txt", "deps": ["data.txt"],
                         "params": ["pretrain.train.epochs"], "outs": ["pre.txt"]},
            "finetune": {"foreach": "${finetune.runs}", "do": {
                "cmd": "python step.py ft_${key}.txt pre.txt", "deps": ["pre.txt"],
                "params": ["finetune.train.epochs"], "outs": ["ft_${key}.txt"]}},
            "report": {"cmd": "python step.py report.json ft_a.txt ft_b.txt",
                       "deps": ["ft_a.txt", "ft_b.txt"],
                       "metrics": [{"report.json": {"cache": False}}]},
        })
    stages.update(extra or {})
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "toy project")
    return root


def run_flow(root: Path, **params):
    params.setdefault("retry_delay_seconds", 0)
    return pflow.pipeline_flow(project_dir=str(root), return_state=True, **params)


def task_runs(state, artifacts: bool = False, expect: frozenset = frozenset()) -> dict:
    """Task runs of a flow run by name (or its artifacts by key), read back from the API.

    The server records task runs from the events the flow run sends, in the background: with
    `expect`, wait (up to 60 s) until those names have all been recorded."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            if artifacts:
                return {a.key: a for a in client.read_artifacts(flow_run_filter=this_run)}
            runs = {run.name: run for run in client.read_task_runs(flow_run_filter=this_run)}
        if expect <= set(runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def task_edges(runs: dict, stages: set[str]) -> set[tuple[str, str]]:
    """(upstream, downstream) stage pairs from the tasks' recorded `wait_for` inputs."""
    by_id = {run.id: name for name, run in runs.items() if name in stages}
    return {(by_id[parent.id], name) for name, run in runs.items() if name in stages
            for parent in run.task_inputs.get("wait_for", [])}


def dvc_edges(root: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """Straight from DVC: stage names and (upstream, downstream) edges."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        return ({s.name for s in graph.nodes},
                {(dep.name, s.name) for s, dep in graph.edges})


def test_task_graph_equals_dvc_graph(harness, tmp_path):
    root = make_project(tmp_path / "toy")
    state = run_flow(root, set_params=["pretrain.train.epochs=3"])
    assert state.is_completed(), state.message
    runs = task_runs(state)
    nodes, edges = dvc_edges(root)
    assert nodes == {"prepare", "pretrain", "finetune@a", "finetune@b", "report"}
    assert {name for name in runs if not name.startswith(("save_exp", "link_mlflow"))} == nodes
    assert task_edges(runs, nodes) == edges
    assert dvc_graph.pipeline_graph(root) == (
        ["prepare", "pretrain", "finetune@a", "finetune@b", "report"], edges)
    # the DVC side: outputs, and an experiment that ran with the override
    result = state.result()
    assert (root / "report.json").is_file()
    assert (root / "pre.txt").is_file()
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"],
                                      cwd=root, capture_output=True, text=True,
                                      check=True).stdout)
    experiments = {exp["name"]: exp["revs"][0]["data"] for commit in shown
                   for exp in commit.get("experiments") or []}
    params = experiments[result["experiment"]]["params"]["params.yaml"]["data"]
    assert params["pretrain"]["train"]["epochs"] == 3
    # ...and the override does not leak: params.yaml is as it was, comments and all, so the
    # next (scheduled) run starts from the committed settings.
    assert (root / "params.yaml").read_text() == PARAMS
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root,
                            capture_output=True, text=True, check=True)
    assert set(json.loads(status.stdout)) == {"pretrain"}  # what the next plain run redoes


def test_added_stage_is_picked_up_without_editing_the_flow(tmp_path):
    root = make_project(tmp_path / "toy", extra={"export": {
        "cmd": "python step.py export.txt ft_a.txt", "deps": ["ft_a.txt"],
        "outs": ["export.txt"]}})
    stages, edges = dvc_graph.pipeline_graph(root)
    assert stages.index("export") > stages.index("finetune@a")
    assert ("finetune@a", "export") in edges and len(stages) == 6


@pytest.mark.parametrize("item, named", [
    ("pretrain.epochz=1", "pretrain.epochz"),       # unknown key
    ("pretrain.train.epochs=many", "pretrain.train.epochs"),    # wrong type
    ("finetune.train.lr=-1", "finetune.train.lr"),              # out of range
    ("no_equals_sign", "no_equals_sign"),           # not key=value
])
def test_bad_override_refused_before_any_stage(harness, tmp_path, item, named):
    root = make_project(tmp_path / "toy")
    params_before = (root / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=named):
        dvc_graph.validate_params(root, dvc_graph.parse_overrides([item]))
    state = run_flow(root, set_params=["finetune.train.epochs=2", item])
    assert state.is_failed() and named in state.message
    assert task_runs(state) == {}  # no task ran
    assert not (root / "data.txt").exists()
    assert (root / "params.yaml").read_text() == params_before


@pytest.mark.parametrize("command", ["run", "trigger"])
def test_bad_override_refused_by_the_cli(tmp_path, capsys, command):
    root = make_project(tmp_path / "toy")
    assert pflow.main([command, "--project-dir", str(root), "-S", "pretrain.epochz=1"]) == 2
    assert "pretrain.epochz" in capsys.readouterr().err
    assert not (root / "data.txt").exists()


def test_stage_failing_once_succeeds_on_retry(harness, tmp_path):
    marker = tmp_path / "attempts"
    root = make_project(tmp_path / "toy", chain=False, extra={"flaky": {
        "cmd": f"python flaky.py flaky.txt {marker}", "deps": ["data.txt"],
        "outs": ["flaky.txt"]}})
    state = run_flow(root, retries=1)
    assert state.is_completed(), state.message
    assert marker.read_text() == "2" and (root / "flaky.txt").read_text() == "ok"
    assert task_runs(state)["flaky"].run_count == 2


def test_failing_stage_fails_the_flow_and_leaves_no_output(harness, tmp_path):
    root = make_project(tmp_path / "toy", chain=False, extra={
        "broken": {"cmd": "python broken.py half.txt", "deps": ["data.txt"],
                   "outs": ["half.txt"]},
        "after": {"cmd": "python step.py after.txt half.txt", "deps": ["half.txt"],
                  "outs": ["after.txt"]}})
    state = run_flow(root, retries=1)
    assert state.is_failed()
    assert "stage broken failed" in state.message and "boom: the stage broke" in state.message
    runs = task_runs(state)
    assert runs["broken"].state.is_failed() and runs["broken"].run_count == 2
    assert "after" not in runs  # downstream never started
    assert not (root / "half.txt").exists() and not (root / "after.txt").exists()
    assert (root / "data.txt").exists()  # the finished upstream stage keeps its output


def test_a_second_flow_run_in_the_same_workspace_is_refused(harness, tmp_path):
    root = make_project(tmp_path / "toy")
    with workspace.exclusive(root, "the-first-run"):
        state = run_flow(root, set_params=["pretrain.train.epochs=5"])
    assert state.is_failed()
    assert "Prefect flow run the-first-run" in state.message
    assert "is running the pipeline in this workspace" in state.message
    assert (root / "params.yaml").read_text() == PARAMS  # not rewritten under the first run
    assert task_runs(state) == {} and not (root / "data.txt").exists()


def test_a_flow_run_is_refused_while_dvc_holds_its_repo_lock(harness, tmp_path):
    from dvc.lock import make_lock
    root = make_project(tmp_path / "toy")
    lock = make_lock(str(root / ".dvc/tmp/lock"), tmp_dir=str(root / ".dvc/tmp"))
    lock.lock()  # as `dvc repro` typed by hand holds it for its bookkeeping between stages
    try:
        state = run_flow(root, set_params=["pretrain.train.epochs=5"])
    finally:
        lock.unlock()
    assert state.is_failed() and "a dvc command is running in this workspace" in state.message
    assert (root / "params.yaml").read_text() == PARAMS
    assert not (root / "data.txt").exists()


def test_a_flow_run_is_refused_while_a_dvc_repro_runs_a_stage(harness, tmp_path):
    """While a stage's command runs, DVC has let go of its repo lock; the stage's read/write
    locks (with dvc's pid) still show that `dvc repro` is at work."""
    root = make_project(tmp_path / "toy", chain=False, extra={"sleeper": {
        "cmd": f"python sleeper.py {tmp_path / 'stage.pid'}", "deps": ["data.txt"],
        "outs": ["slept.txt"]}})
    manual = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "stage.pid").is_file():
            assert manual.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        state = run_flow(root, set_params=["pretrain.train.epochs=5"])
    finally:
        os.killpg(manual.pid, signal.SIGKILL)
        manual.wait()
    assert state.is_failed() and "is running in this workspace" in state.message
    assert "dvc repro" in state.message
    assert (root / "params.yaml").read_text() == PARAMS


def leave_overrides_of_a_killed_run(root: Path, leaked: str) -> Path:
    """What a flow run killed with SIGKILL leaves behind: its overrides in params.yaml, the
    original beside it, and the hash of what it wrote."""
    import hashlib
    backup = root / pflow.PARAMS_BACKUP
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_text(PARAMS)
    (root / "params.yaml").write_text(leaked)
    (root / pflow.PARAMS_WRITTEN).write_text(hashlib.sha256(leaked.encode()).hexdigest())
    return backup


def test_overrides_left_by_a_killed_flow_run_are_put_back(harness, tmp_path):
    root = make_project(tmp_path / "toy")
    backup = leave_overrides_of_a_killed_run(root, PARAMS.replace("epochs: 1", "epochs: 9"))
    shutil.rmtree(root / ".dvc/tmp", ignore_errors=True)  # as in a fresh clone
    state = run_flow(root)
    assert state.is_completed(), state.message
    assert (root / "params.yaml").read_text() == PARAMS and not backup.exists()
    assert not (root / pflow.PARAMS_WRITTEN).exists()
    assert subprocess.run([sys.executable, "-m", "dvc", "status", "-q"], cwd=root).returncode == 0


def test_params_edited_after_a_killed_run_are_kept(harness, tmp_path):
    """The leftover original is put back only over what the killed run wrote, never over a
    user's later edit."""
    root = make_project(tmp_path / "toy")
    backup = leave_overrides_of_a_killed_run(root, PARAMS.replace("epochs: 1", "epochs: 9"))
    edited = PARAMS.replace("epochs: 1", "epochs: 2")
    (root / "params.yaml").write_text(edited)
    state = run_flow(root)
    assert state.is_completed(), state.message
    assert (root / "params.yaml").read_text() == edited and not backup.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_flow_run_leaves_no_stage_running_and_no_lock(harness, tmp_path, sig):
    """SIGTERM: the task stops its dvc process group and params.yaml is put back. SIGKILL (no
    clean-up possible): dvc and the stage die with their parents (PR_SET_PDEATHSIG)."""
    from prefect.settings import PREFECT_API_URL
    root = make_project(tmp_path / "toy", chain=False, extra={"sleeper": {
        "cmd": f"python sleeper.py {tmp_path / 'stage.pid'}", "deps": ["data.txt"],
        "outs": ["slept.txt"]}})
    flow_proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pipeline/orchestration/flow.py"), "run", "--project-dir",
         str(root), "--retries", "0", "-S", "pretrain.train.epochs=2"],
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "stage.pid"
    deadline = time.monotonic() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert flow_proc.poll() is None, flow_proc.stderr.read()
        assert time.monotonic() < deadline, "the sleeping stage never started"
        time.sleep(0.2)
    stage_pid = int(pid_file.read_text())
    assert (root / "params.yaml").read_text() != PARAMS  # the override is in place
    flow_proc.send_signal(sig)
    flow_proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stage_pid), "the stage outlived the flow run"
    # DVC's lock is free: a dvc command runs at once.
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "busy" not in status.stderr, status.stderr
    if sig == signal.SIGTERM:
        assert flow_proc.returncode == 143  # a clean stop, not a traceback
        stderr = flow_proc.stderr.read()
        assert "flow run stopped" in stderr and "Traceback" not in stderr, stderr
        assert (root / "params.yaml").read_text() == PARAMS
    else:  # put back by the next flow run (test_overrides_left_by_a_killed_flow_run_...)
        assert (root / pflow.PARAMS_BACKUP).read_text() == PARAMS
