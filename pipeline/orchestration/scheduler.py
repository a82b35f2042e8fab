"""Start a local Prefect server and serve the scheduled pipeline deployment; Ctrl-C stops both.

    python -m pipeline.orchestration.scheduler [--cron EXPR] [--config FILE]   (= make serve)

1. checks pipeline/orchestration/schedule.yaml (cron, timezone, parameters) and params.yaml:
   refused before anything starts if one is bad;
2. starts `prefect server start` on the host/port of the config (127.0.0.1:4200), its SQLite
   database under $PREFECT_HOME (default: <project>/.prefect), and waits until it is healthy
   (if a server already answers there it is used, and left running at the end);
3. runs `python pipeline/orchestration/flow.py serve`, which registers the deployment with its
   cron schedule and runs the flow runs it schedules (or that `make trigger` asks for);
4. on Ctrl-C / SIGTERM (or if either child exits) stops the serve process first (it pauses the
   schedule and marks its runs through the server's API, so it needs the server), then the
   server: each gets SIGINT (a Ctrl-C), then SIGTERM/SIGKILL for anything left in its process
   group (each child has its own), so no flow run, DVC stage or server process outlives this.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a file
    sys.path.insert(0, str(ROOT))

from pipeline.orchestration import processes  # noqa: E402

# Settings of the local server. Its SQLite store allows one writer at a time, and Prefect's
# "late runs" service, which relabels overdue scheduled runs "Late", wrote in deferred
# transactions that failed with `database is locked` tracebacks while a flow run and a trigger
# were in flight (tests/test_scheduler.py). The flow has its own policy for overdue runs (they
# are cancelled when the busy run ends, see flow.py), so the label is not needed.
SERVER_ENV = {"PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false"}


def log(message: str) -> None:
    print(f"[scheduler {time.strftime('%H:%M:%S')}] {message}", flush=True)


def stop(proc: subprocess.Popen | None, name: str, grace: float) -> None:
    """SIGINT the child (as Ctrl-C would: Prefect's own clean shutdown), then SIGTERM and at
    last SIGKILL whatever is left of its process group, so nothing it started survives."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"{name} still running {grace:.0f} s after SIGINT")
    if left := processes.group_members(proc.pid):
        log(f"stopping what is left of {name}'s process group: {left}")
        processes.stop_group(proc.pid)
    log(f"{name} stopped (exit {proc.wait()})")


class Shutdown:
    """Set by SIGINT/SIGTERM once installed: the scheduler winds down at its next check."""

    def __init__(self):
        self.requested = False

    def on_signal(self, signum, _frame) -> None:
        self.requested = True
        log(f"got {signal.Signals(signum).name}: shutting down")

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(HERE / "schedule.yaml"))
    parser.add_argument("--cron", help="override the cron expression of the config")
    parser.add_argument("--project-dir", help="DVC project the flow runs (default: this one)")
    return parser.parse_args(argv)


def start_server(host: str, port: int) -> subprocess.Popen:
    log(f"starting Prefect server on {host}:{port} "
        f"(SQLite under {os.environ['PREFECT_HOME']})")
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host,
         "--port", str(port)], start_new_session=True,
        env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
             **SERVER_ENV})


def wait_until_healthy(server: subprocess.Popen, api_url: str, host: str, port: int,
                       shutdown: Shutdown) -> int | None:
    """None once the server answers; else the exit code (0: asked to stop, 1: it failed)."""
    from pipeline.orchestration import dvc_graph as dg
    started = time.monotonic()
    while not dg.server_up(api_url):
        if shutdown.requested or server.poll() is not None or time.monotonic() - started > 120:
            log("server did not become healthy" if not shutdown.requested else "stopped early")
            return 0 if shutdown.requested else 1
        time.sleep(0.5)
    log(f"server healthy after {time.monotonic() - started:.1f} s; UI at "
        f"http://{host}:{port}")
    return None


def start_serve(args: argparse.Namespace) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "flow.py"), "serve", "--config", args.config,
         *(["--project-dir", args.project_dir] if args.project_dir else []),
         *(["--cron", args.cron] if args.cron else [])],
        start_new_session=True)


def watch(serve: subprocess.Popen, server: subprocess.Popen | None, shutdown: Shutdown) -> bool:
    """Until a stop is asked for or a child exits; True if a child exited on its own."""
    failed = False
    while not shutdown.requested:
        for proc, name in ((serve, "serve"), (server, "server")):
            if proc is not None and proc.poll() is not None:
                log(f"{name} exited unexpectedly (exit {proc.returncode})")
                shutdown.requested = failed = True
        time.sleep(0.5)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline import env
    env.apply()
    from pipeline.orchestration import dvc_graph as dg
    try:
        config = dg.load_schedule(args.config, args.cron)
        overrides = dg.parse_overrides(config["parameters"].get("set_params"))
        dg.validate_params(args.project_dir or ROOT, overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server_cfg = config.get("server") or {}
    host, port = str(server_cfg.get("host", "127.0.0.1")), int(server_cfg.get("port", 4200))
    api_url = dg.api_url(config)
    os.environ["PREFECT_API_URL"] = api_url

    failed = False
    shutdown = Shutdown()
    shutdown.install()
    server = serve = None
    try:
        if dg.server_up(api_url):
            log(f"a Prefect server already answers at {api_url}: using it (and leaving it up)")
        else:
            server = start_server(host, port)
            code = wait_until_healthy(server, api_url, host, port, shutdown)
            if code is not None:
                return code
        serve = start_serve(args)
        log(f"serving deployment {config['deployment']!r} on cron {config['cron']!r} "
            f"({config.get('timezone') or 'UTC'}); Ctrl-C to stop")
        failed = watch(serve, server, shutdown)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        stop(serve, "serve", grace=10)   # first: it talks to the server while shutting down
        stop(server, "server", grace=20)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
