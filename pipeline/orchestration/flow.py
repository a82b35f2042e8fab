"""Prefect flow that runs the DVC pipeline, one Prefect task per DVC stage.

    python -m pipeline.orchestration.flow run [-S key=value ...] [--force]
        one run now (local server if up)
    python -m pipeline.orchestration.flow serve [--cron EXPR]
        serve the scheduled deployment
    python -m pipeline.orchestration.flow trigger [-S key=value ...]
        ask the served deployment to run now
(`python -m pipeline.orchestration.scheduler` starts a local server and `serve` together; see its
docstring.) `--force`, `--retries` and `--retry-delay` apply to the run started (run, trigger) or
to every scheduled run (serve), replacing the values of pipeline/orchestration/schedule.yaml.

Design:
- The DAG comes from DVC (`Repo.index.graph`, read after the overrides are applied, since a
  `foreach` over a parameter can add stages). Tasks run one at a time in topological order (DVC
  holds a repo lock per command, and 2 cores gain nothing from parallel training); each task gets
  its DVC upstream stages as `wait_for`, so Prefect's task graph has exactly DVC's edges.
- A flow run is a DVC experiment run in the workspace, like `dvc exp run -S`: validated overrides
  are written into params.yaml, each stage runs as `dvc repro --single-item <stage>` (unchanged
  stages are skipped from DVC's cache), then `dvc exp save` records params, dvc.lock, metrics and
  outputs as an experiment named after the flow run. Then params.yaml is put back as it was, so
  one run's overrides never leak into the next (the outputs stay, saved as that experiment).
- One run per workspace: a flow run holds `.anyorder/workspace.lock` (see workspace.py); a second
  flow run, or a flow run while `dvc repro` runs, is refused before it touches anything, and a
  `dvc repro` typed during a flow run is refused by its first stage.
- Bad overrides (unknown key, wrong type, out of range) raise ConfigError before any stage runs.
- Stage output is streamed line by line into the task's Prefect log. A failing stage is retried
  (`retries`, `retry_delay_seconds`); once it fails for good its outputs are removed (DVC leaves
  them) and the flow run fails with the stage's last output lines in the exception. A task that
  is cancelled or crashes takes its `dvc` process group with it (no orphan holds DVC's lock).
- Schedules: a scheduled run that starts more than `skip_if_late_seconds` after its time (because
  another run was busy) skips itself, and each run cancels, when it ends, the scheduled runs that
  fell due meanwhile, so a run triggered by hand is the next to run, as cron would have it.
- MLflow: stages get ANYORDER_PIPELINE_RUN_ID / ANYORDER_PREFECT_FLOW_RUN_ID = the flow run id
  and tag their runs with it; at the end the flow tags those runs with the DVC experiment name
  and publishes a Prefect artifact listing them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file, or loaded by Prefect from its path
    sys.path.insert(0, str(ROOT))

from pipeline.stage import tracking_uri  # noqa: E402  (also: the library beside it on sys.path)
from pipeline import env  # noqa: E402
from pipeline.orchestration import dvc_graph as dg, processes, workspace  # noqa: E402
from pipeline.orchestration.flow_workspace import (backup_params, check_dvc_idle,  # noqa: E402
                                                   record_written_params, restore_params)

env.apply()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402
from prefect.states import Cancelled  # noqa: E402

SCHEDULE_FILE = Path(__file__).with_name("schedule.yaml")
FLOW_NAME = "anyorder-pipeline"
TAIL_LINES = 40  # output lines of a failed stage quoted in the flow run's error
PARAMS_BACKUP, PARAMS_WRITTEN = workspace.PARAMS_BACKUP, workspace.PARAMS_WRITTEN


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message ends with its last output lines."""


def _stage_env() -> dict[str, str]:
    environ = dict(os.environ)
    run_id = str(flow_run.get_id() or "")
    environ.update(ANYORDER_PIPELINE_RUN_ID=run_id, PYTHONUNBUFFERED="1",
                   **{workspace.OWNER_ENV: run_id})
    # Stage commands say `python ...`: make that this interpreter, even outside an activated venv.
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    return environ


def _run_dvc(root: Path, args: list[str], on_line) -> int:
    """`dvc ARGS` under supervise.py in a process group of its own, each output line
    passed to `on_line`; returns the exit code. If this task is cancelled, interrupted or crashes,
    the group (dvc and the stage it runs) is stopped before the exception goes on; if this
    process dies outright, supervise.py stops it."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("supervise.py")),
                             sys.executable, "-m", "dvc", *args], cwd=root, env=_stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    try:
        for line in proc.stdout:
            on_line(line.rstrip().rsplit("\r", 1)[-1])  # progress bars: keep the last redraw
        return proc.wait()
    except BaseException:
        processes.stop_group(proc.pid)
        proc.wait()
        raise


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(root: str, stage: str, force: bool = False) -> str:
    """`dvc repro --single-item <stage>`, its output streamed into this task's log."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = False  # DVC deleted the outputs and ran the command (not: lock busy, dep missing)

    def on_line(line: str) -> None:
        nonlocal started
        logger.info("%s", line)
        tail.append(line)
        started = started or line.startswith(f"Running stage '{stage}'")

    returncode = _run_dvc(Path(root), ["repro", "--single-item", stage,
                                       *(["--force"] if force else [])], on_line)
    if returncode:
        removed = [p for p in dg.stage_outputs(root, stage) if started and p.exists()]
        for path in removed:  # no half-written outputs (DVC leaves what a failed command wrote)
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        raise StageFailed(f"stage {stage} failed (exit {returncode}); removed outputs "
                          f"{[p.name for p in removed]}; last output:\n" + "\n".join(tail))
    return stage


@task(cache_policy=NO_CACHE)
def save_experiment(root: str) -> Optional[str]:
    """`dvc exp save`: the workspace (params, dvc.lock, metrics, outputs) as a DVC experiment."""
    logger = get_run_logger()
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root,
                      capture_output=True).returncode:
        logger.warning("%s is not a git repository with a commit: no DVC experiment saved", root)
        return None
    name = f"{flow_run.get_name()}-{str(flow_run.get_id())[-8:]}"  # ids are time-ordered: tail
    output: list[str] = []
    returncode = _run_dvc(Path(root), [
        "exp", "save", "--name", name, "--message",
        f"prefect flow run {flow_run.get_id()} ({flow_run.get_name()})",
        *[arg for path in dg.experiment_files(root) for arg in ("-I", path)]], output.append)
    logger.info("%s", "\n".join(output).strip())
    if returncode:
        raise RuntimeError("dvc exp save failed:\n" + "\n".join(output))
    return name


@task(cache_policy=NO_CACHE)
def link_mlflow(root: str, experiment: Optional[str]) -> list[str]:
    """Tag this flow run's MLflow runs with the DVC experiment; list them in a Prefect artifact."""
    logger, run_id = get_run_logger(), str(flow_run.get_id())
    uri = tracking_uri(dg.load_settings(Path(root) / dg.PARAMS_FILE), Path(root))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        logger.warning("no MLflow store at %s: no stage logged to MLflow", uri)
        return []
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, f"tags.`prefect.flow_run_id` = '{run_id}'") if ids else []
    lines = [f"MLflow tracking URI `{uri}` (UI: `make mlflow-ui`), filter "
             f"`tags.\"prefect.flow_run_id\" = '{run_id}'`; DVC experiment `{experiment}`", "",
             "| stage run | MLflow experiment | run id |", "|---|---|---|"]
    for run in runs:
        if experiment:
            client.set_tag(run.info.run_id, "dvc.experiment", experiment)
        lines.append(f"| {run.info.run_name} | {run.info.experiment_id} | {run.info.run_id} |")
        logger.info("MLflow run %s (%s) in experiment %s", run.info.run_id, run.info.run_name,
                    run.info.experiment_id)
    create_markdown_artifact("\n".join(lines), key="mlflow-runs",
                             description="MLflow runs of this flow run")
    return [run.info.run_id for run in runs]


def _late_scheduled_run(skip_if_late_seconds: Optional[float]) -> Optional[str]:
    """Why this run should skip itself (a scheduled run starting late), or None."""
    if skip_if_late_seconds is None or not deployment.get_id():
        return None
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.get_id())
    scheduled = run.expected_start_time
    if not run.auto_scheduled or scheduled is None:
        return None  # asked for by hand: always runs
    late = (datetime.datetime.now(datetime.timezone.utc) - scheduled).total_seconds()
    if late <= skip_if_late_seconds:
        return None
    return (f"skipped: scheduled for {scheduled:%Y-%m-%d %H:%M:%S %Z} but started {late:.0f} s "
            f"late (another run was busy); the next scheduled run picks up from here")


@flow(name=FLOW_NAME)
def pipeline_flow(set_params: Optional[list[str]] = None, force: bool = False, retries: int = 2,
                  retry_delay_seconds: float = 10.0, save_exp: bool = True,
                  project_dir: Optional[str] = None,
                  skip_if_late_seconds: Optional[float] = None) -> Any:
    """Run the DVC pipeline stage by stage. set_params: `dvc exp run -S` style key=value items."""
    logger = get_run_logger()
    root = Path(project_dir or ROOT).resolve()
    if reason := _late_scheduled_run(skip_if_late_seconds):
        logger.warning("%s", reason)
        return Cancelled(message=reason)
    try:
        with workspace.exclusive(root, str(flow_run.get_id() or "")):
            check_dvc_idle(root)
            restore_params(root, logger, crashed=True)  # a killed earlier run left overrides
            overrides = dg.parse_overrides(set_params)
            dg.validate_params(root, overrides)  # ConfigError naming the key; nothing ran yet
            if overrides:
                backup_params(root)
            try:
                dg.apply_overrides(root, overrides)
                if overrides:
                    record_written_params(root)
                return _run_stages(root, overrides, force, retries, retry_delay_seconds, save_exp,
                                   logger)
            finally:
                restore_params(root, logger)
    finally:
        _cancel_runs_missed_meanwhile(logger)


def _cancel_runs_missed_meanwhile(logger) -> None:
    """Scheduled runs that fell due while this one ran: cancel them, so a run triggered by hand
    goes next. Clean-up only: a failure here is a warning, never the run's outcome."""
    name = deployment.get_name()
    if not name:
        return
    try:
        if missed := skip_missed_runs(name):
            logger.info("cancelled %d scheduled run(s) that fell due while this one ran", missed)
    except Exception as exc:  # the API unreachable, the store busy: the next run tries again
        logger.warning("could not cancel the scheduled runs missed meanwhile: %s", exc)


def _run_stages(root: Path, overrides: dict, force: bool, retries: int,
                retry_delay_seconds: float, save_exp: bool, logger) -> dict[str, Any]:
    stages, edges = dg.pipeline_graph(root)
    logger.info("DVC pipeline in %s: %s; overrides %s", root, " -> ".join(stages), overrides)
    stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    states: dict[str, Any] = {}
    for name in stages:
        upstream = [states[a] for a, b in sorted(edges) if b == name]
        states[name] = stage_task(str(root), name, force, wait_for=upstream, return_state=True)
        if states[name].is_failed():
            states[name].result()  # raises the stage's error: the flow run fails with it
    experiment = save_experiment(str(root)) if save_exp else None
    mlflow_runs = link_mlflow(str(root), experiment)
    return {"stages": stages, "experiment": experiment, "mlflow_runs": mlflow_runs}


# ---------------------------------------------------------------------------------- command line
def skip_missed_runs(deployment_name: str) -> int:
    """Cancel runs the schedule created for times that have passed: while nothing served the
    deployment, or while the one runner slot was busy. Prefect would run them all, back to back
    and with the parameters of back then; like cron, the next scheduled run is the one that
    counts. Runs asked for by hand stay."""
    from prefect import get_client
    from prefect.client.schemas import filters as f

    now = datetime.datetime.now(datetime.timezone.utc)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=f.FlowFilter(name=f.FlowFilterName(any_=[FLOW_NAME])),
            deployment_filter=f.DeploymentFilter(name=f.DeploymentFilterName(any_=[deployment_name])),
            flow_run_filter=f.FlowRunFilter(
                state=f.FlowRunFilterState(type=f.FlowRunFilterStateType(any_=["SCHEDULED"])),
                expected_start_time=f.FlowRunFilterExpectedStartTime(before_=now)))
        missed = [run for run in runs if run.auto_scheduled]
        for run in missed:
            client.set_flow_run_state(run.id, Cancelled(
                message="missed: the deployment was not served, or busy, at its scheduled time"),
                force=True)
    return len(missed)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "serve", "trigger"])
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter override, as for `dvc exp run -S` (repeatable)")
    parser.add_argument("--force", action="store_true", default=None,
                        help="rerun stages even if cached")
    parser.add_argument("--retries", type=int, help="retries per failing stage")
    parser.add_argument("--retry-delay", type=float, help="seconds between retries")
    parser.add_argument("--cron", help="serve: override the cron expression of the config")
    parser.add_argument("--config", default=str(SCHEDULE_FILE), help="schedule config file")
    parser.add_argument("--project-dir", help="DVC project to run (default: this repository)")
    return parser.parse_args(argv)


def flow_parameters(args: argparse.Namespace) -> tuple[dict, dict]:
    """The schedule config and the flow's parameters (the config's, replaced by the command
    line's), checked: ValueError naming what is wrong before any server or stage is contacted."""
    if args.cron is not None and args.command != "serve":
        raise dg.ScheduleError("--cron only applies to serve")
    config = dg.load_schedule(args.config, args.cron)
    parameters = config["parameters"]
    if args.set_param or args.command == "run":
        parameters["set_params"] = args.set_param
    for key, value in (("force", args.force), ("retries", args.retries),
                       ("retry_delay_seconds", args.retry_delay)):
        if value is not None:
            parameters[key] = value
    if args.project_dir:
        parameters["project_dir"] = str(Path(args.project_dir).resolve())
    dg.check_flow_parameters(parameters, "command line")
    dg.validate_params(parameters.get("project_dir") or ROOT,
                       dg.parse_overrides(parameters.get("set_params")))
    return config, parameters


def run_now(parameters: dict, api_url: Optional[str]) -> int:
    """One flow run in this process, on the server at `api_url` if one answers there."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not os.environ.get("PREFECT_API_URL") and not dg.server_up(api_url):
        api_url = None  # no local server running: Prefect starts a temporary one
    # SIGTERM (kill, a supervisor) unwinds like Ctrl-C: the running stage's process group is
    # stopped and params.yaml put back, instead of the process vanishing mid-stage.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with temporary_settings({PREFECT_API_URL: api_url} if api_url else {}):
            state = pipeline_flow(**parameters, return_state=True)
    except KeyboardInterrupt as exc:
        print(f"flow run stopped ({exc or 'Ctrl-C'}): the running stage was stopped and "
              f"params.yaml put back", file=sys.stderr)
        return 143 if "SIGTERM" in str(exc) else 130
    print(f"flow run {state.name}: {state.message or ''}", file=sys.stderr)
    return 0 if state.is_completed() else 1


def serve(config: dict, parameters: dict) -> None:
    """Serve the deployment on its cron schedule, after cancelling the runs missed meanwhile."""
    from prefect.schedules import Cron

    if missed := skip_missed_runs(config["deployment"]):
        print(f"cancelled {missed} scheduled run(s) missed while nothing was serving")
    pipeline_flow.serve(name=config["deployment"], parameters=parameters,
                        schedule=Cron(config["cron"], timezone=config.get("timezone")),
                        limit=1, tags=["dvc"], description="DVC pipeline on a schedule")


def trigger(config: dict, parameters: dict, api_url: str) -> None:
    """Ask the served deployment for a run now."""
    from prefect.deployments import run_deployment

    run = run_deployment(f"{FLOW_NAME}/{config['deployment']}", parameters=parameters,
                         timeout=0, as_subflow=False)
    print(f"flow run {run.name} ({run.id}) scheduled; "
          f"UI: {api_url.removesuffix('/api')}/runs/flow-run/{run.id}")


def main(argv: Optional[list[str]] = None) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    args = parse_args(argv)
    try:  # refuse bad input before contacting any server or running any stage
        config, parameters = flow_parameters(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api_url = os.environ.get("PREFECT_API_URL") or dg.api_url(config)
    if args.command == "run":
        return run_now(parameters, api_url)
    if not dg.server_up(api_url):
        print(f"error: no Prefect server answers at {api_url} (start one with "
              f"`python -m pipeline.orchestration.scheduler`)", file=sys.stderr)
        return 1
    with temporary_settings({PREFECT_API_URL: api_url}):
        if args.command == "serve":
            serve(config, parameters)
            return 0
        trigger(config, parameters, api_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
