"""The scheduler as a user runs it (`make serve`, `make trigger`): real Prefect servers and real
processes on loopback, a toy DVC project, nothing of the developer's Prefect state touched."""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline.orchestration import dvc_graph
from pipeline.orchestration import flow as pflow
from pipeline.orchestration import scheduler as scheduler_module
from test_flow import make_project

pytestmark = pytest.mark.slow
FLOW = ROOT / "pipeline/orchestration/flow.py"  # both run as a user runs them: by path
SCHEDULER = ROOT / "pipeline/orchestration/scheduler.py"


NAP = """\
import os, sys, time
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(str(os.getpid()))
time.sleep(float(sys.argv[2]))
open(sys.argv[1], "w").write("rested")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, port: int, deployment: str, cron: str = "0 0 1 1 *") -> Path:
    path.write_text(yaml.safe_dump({
        "deployment": deployment, "cron": cron, "timezone": "UTC",
        "parameters": {"set_params": [], "retries": 0, "retry_delay_seconds": 0,
                       "skip_if_late_seconds": 60},
        "server": {"host": "127.0.0.1", "port": port}}))
    return path


class Logged:
    """A process whose combined output is collected line by line (for waiting on a line)."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output}"
            time.sleep(0.2)


def processes_mentioning(*needles: str) -> list[str]:
    import psutil
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] != os.getpid() and any(n in cmdline for n in needles):
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


def api(port: int):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    return temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"})


def wait_for_run(port: int, run_id, timeout: float = 180):
    from prefect import get_client
    deadline = time.monotonic() + timeout
    with api(port), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run still {run.state.name}"
            time.sleep(1)


@pytest.fixture(scope="module")
def environ(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    return {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def running_server(environ):
    """A Prefect server started by hand (as a team's shared one would be)."""
    port = free_port()
    server = Logged([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                     "--port", str(port)],
                    {**environ, "PREFECT_API_URL": "", **scheduler_module.SERVER_ENV})
    deadline = time.monotonic() + 120
    while not dvc_graph.server_up(f"http://127.0.0.1:{port}/api"):
        assert server.proc.poll() is None and time.monotonic() < deadline, server.output
        time.sleep(0.5)
    yield port, server
    os.killpg(server.proc.pid, signal.SIGINT)
    server.proc.wait(timeout=60)


def trigger(config: Path, project: Path, environ: dict, *overrides: str) -> str:
    """`make trigger` (with `-S` overrides); returns the id of the flow run it asked for."""
    proc = subprocess.run([sys.executable, str(FLOW), "trigger", "--config",
                           str(config), "--project-dir", str(project),
                           *[arg for o in overrides for arg in ("-S", o)]],
                          env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("(")[1].split(")")[0]


def test_scheduler_starts_a_server_serves_triggers_and_stops_cleanly_mid_run(environ, tmp_path):
    project = make_project(tmp_path / "toy", chain=False, extra={"nap": {
        "cmd": f"python nap.py nap.txt ${{finetune.train.epochs}} {tmp_path / 'nap.pid'}",
        "deps": ["data.txt"], "params": ["finetune.train.epochs"], "outs": ["nap.txt"]}})
    (project / "nap.py").write_text(NAP)
    port = free_port()
    config = write_config(tmp_path / "schedule.yaml", port, "own-server")
    scheduler = Logged([sys.executable, str(SCHEDULER), "--config",
                        str(config), "--project-dir", str(project)], environ)
    scheduler.wait_for("serving deployment 'own-server'")
    scheduler.wait_for("prefect deployment run")  # serve registered the deployment

    # `make trigger`, with an override: runs now, and completes.
    run = wait_for_run(port, trigger(config, project, environ, "pretrain.train.epochs=4"))
    assert run.state.is_completed(), run.state.message
    assert (project / "nap.txt").is_file()
    assert "pretrain.train.epochs=4" in run.parameters["set_params"]

    # A run whose stage sleeps for minutes, stopped by `make serve`'s Ctrl-C / SIGTERM mid-stage.
    (tmp_path / "nap.pid").unlink()
    trigger(config, project, environ, "finetune.train.epochs=300")
    deadline = time.monotonic() + 120
    while not (tmp_path / "nap.pid").is_file() or not (tmp_path / "nap.pid").read_text():
        assert time.monotonic() < deadline, scheduler.output
        time.sleep(0.2)
    stage_pid = int((tmp_path / "nap.pid").read_text())
    scheduler.proc.send_signal(signal.SIGTERM)
    assert scheduler.proc.wait(timeout=90) == 0, scheduler.output
    assert "server stopped" in scheduler.output and "serve stopped" in scheduler.output
    assert not dvc_graph.server_up(f"http://127.0.0.1:{port}/api")
    deadline = time.monotonic() + 30
    while psutil_alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil_alive(stage_pid), "the stage outlived `make serve`"
    assert processes_mentioning(str(config), f"--port {port}", str(project)) == []
    assert "database is locked" not in scheduler.output


def psutil_alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_scheduler_reuses_a_running_server_and_leaves_it_up(environ, running_server, tmp_path):
    port, _ = running_server
    project = make_project(tmp_path / "toy")
    config = write_config(tmp_path / "schedule.yaml", port, "shared-server")
    scheduler = Logged([sys.executable, str(SCHEDULER), "--config",
                        str(config), "--project-dir", str(project)], environ)
    scheduler.wait_for("already answers")
    scheduler.wait_for("prefect deployment run")
    scheduler.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert scheduler.proc.wait(timeout=90) == 0, scheduler.output
    assert dvc_graph.server_up(f"http://127.0.0.1:{port}/api")  # not ours to stop
    assert processes_mentioning(str(config)) == []


def _deployment_with_past_runs(port: int, name: str, minutes: int):
    """A deployment of the pipeline flow (schedule: every minute) with the auto-scheduled runs
    of the last `minutes` minutes, as the scheduler creates them, plus one run asked for by hand
    for the same past time."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.states import Scheduled

    now = datetime.datetime.now(datetime.timezone.utc)
    with api(port), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(pflow.FLOW_NAME)
        deployment_id = client.create_deployment(
            flow_id, name, schedules=[DeploymentScheduleCreate(
                schedule=CronSchedule(cron="* * * * *"))])
        client.request("POST", f"/deployments/{deployment_id}/schedule", json={
            "start_time": (now - datetime.timedelta(minutes=minutes)).isoformat(),
            "end_time": (now - datetime.timedelta(seconds=30)).isoformat()})
        manual = client.create_flow_run_from_deployment(
            deployment_id, state=Scheduled(scheduled_time=now - datetime.timedelta(minutes=2)))
    return deployment_id, manual.id


def _runs(port: int, deployment_id) -> list:
    from prefect import get_client
    from prefect.client.schemas import filters as f
    with api(port), get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=f.DeploymentFilter(
            id=f.DeploymentFilterId(any_=[deployment_id])))


def test_runs_missed_while_nothing_served_are_cancelled_and_manual_ones_kept(running_server):
    port, _ = running_server
    deployment_id, manual_id = _deployment_with_past_runs(port, "missed-runs", minutes=5)
    missed = [r for r in _runs(port, deployment_id) if r.auto_scheduled]
    assert len(missed) >= 4
    with api(port):
        assert pflow.skip_missed_runs("missed-runs") == len(missed)
    states = {r.id: r.state for r in _runs(port, deployment_id)}
    assert all(states[r.id].is_cancelled() for r in missed)
    assert states[manual_id].is_scheduled()  # asked for by hand: it stays




def test_a_run_triggered_while_another_runs_goes_next(environ, running_server, tmp_path):
    """Scheduled runs that fall due while the one runner slot is busy are cancelled when the busy
    run ends (cron does not replay them), so a run asked for by hand is the next to run."""
    port, server = running_server
    project = make_project(tmp_path / "toy", chain=False, extra={"nap": {
        "cmd": "python nap.py nap.txt 12", "deps": ["data.txt"], "outs": ["nap.txt"]}})
    (project / "nap.py").write_text(NAP)
    config = write_config(tmp_path / "schedule.yaml", port, "busy", cron="* * * * *")
    scheduler = Logged([sys.executable, str(SCHEDULER), "--config",
                        str(config), "--project-dir", str(project)], environ)
    scheduler.wait_for("prefect deployment run")

    from prefect import get_client
    first = trigger(config, project, environ)
    scheduler.wait_for("Running stage 'nap'")
    with api(port), get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(f"{pflow.FLOW_NAME}/busy").id
        # Runs that fall due while `first` is busy (as a minutely schedule creates them).
        now = datetime.datetime.now(datetime.timezone.utc)
        client.request("POST", f"/deployments/{deployment_id}/schedule", json={
            "start_time": (now - datetime.timedelta(minutes=3)).isoformat(),
            "end_time": (now - datetime.timedelta(seconds=1)).isoformat()})
    second = trigger(config, project, environ)
    assert wait_for_run(port, first).state.is_completed()
    done = wait_for_run(port, second)
    assert done.state.is_completed(), done.state.message
    first_run = wait_for_run(port, first)
    piled = [r for r in _runs(port, deployment_id)
             if r.auto_scheduled and r.expected_start_time < first_run.end_time]
    assert len(piled) >= 3
    # Cancelled by the busy run as it ended, so they never started a flow-run process.
    assert all(r.state.is_cancelled() and r.state.message.startswith("missed:") for r in piled), \
        [(r.name, r.state.name, r.state.message) for r in piled]
    assert done.start_time > first_run.end_time
    scheduler.proc.send_signal(signal.SIGINT)
    assert scheduler.proc.wait(timeout=90) == 0, scheduler.output
    assert "database is locked" not in server.output + scheduler.output
