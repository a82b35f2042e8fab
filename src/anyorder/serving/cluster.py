"""A local cluster on loopback: the HTTP service with the router as its backend, and N block
workers (separate processes) announcing themselves to it.

    anyorder-cluster exports/ls_best --workers 4 --replicas 2 --port 8000

Block b is hosted by workers (b + r) mod N for r < replicas, so with replicas >= 2 every block
survives the loss of any one worker. `--restart` starts a worker again when it dies (with
`--crash-after` that is a worker that keeps crashing and coming back); `--faulty K` gives the
chaos flags to the first K workers only. Ctrl-C stops the service, then the workers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from typing import Optional, Sequence

from anyorder.export.runtime import ExportError, read_manifest
from anyorder.export.sources import resolve_source

CHAOS_FLAGS = ("fail_rate", "delay_ms", "crash_after", "garbage_rate")


def assign_blocks(depth: int, workers: int, replicas: int) -> list[list[int]]:
    """The blocks of each worker: block b on workers (b + r) % workers, r < replicas."""
    if not 1 <= replicas <= workers:
        raise ExportError(f"--replicas {replicas}: between 1 and --workers ({workers})")
    hosted: list[list[int]] = [[] for _ in range(workers)]
    for block in range(depth):
        for replica in range(replicas):
            hosted[(block + replica) % workers].append(block)
    if any(not blocks for blocks in hosted):
        raise ExportError(f"{workers} workers for {depth} blocks x {replicas} replicas leaves "
                          f"workers with nothing to host; use at most {depth * replicas} workers")
    return [sorted(blocks) for blocks in hosted]


def worker_command(export_dir: str, blocks: Sequence[int], router: str, port: int = 0,
                   chaos: Optional[dict] = None, seed: int = 0,
                   heartbeat_s: float = 1.0) -> list[str]:
    command = [sys.executable, "-m", "anyorder.serving.worker", str(export_dir),
               "--blocks", ",".join(map(str, blocks)), "--port", str(port), "--router", router,
               "--heartbeat", str(heartbeat_s), "--seed", str(seed)]
    for key, value in (chaos or {}).items():
        if value:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def launch(command: Sequence[str], timeout_s: float = 60.0, env: Optional[dict] = None
           ) -> tuple[subprocess.Popen, str]:
    """Start a server process (worker or service) and wait, at most `timeout_s`, for the URL it
    prints on its first stdout line; RuntimeError with its stderr if it exits or stays silent."""
    import json
    import select
    import time

    # stderr goes to a file, not a pipe: nobody reads a pipe after start-up, and a full one
    # would block the server mid-request.
    errors = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=errors, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                               preexec_fn=die_with_parent)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if line.startswith("{"):
                return process, json.loads(line)["url"]
        if process.poll() is not None:
            break
    process.kill()
    process.wait()
    errors.seek(0)
    raise RuntimeError(f"{' '.join(command)} did not start within {timeout_s:.0f} s: "
                       f"{errors.read()[-2000:]}")


def die_with_parent() -> None:
    """In a child, before exec: on Linux, have the kernel send SIGTERM when the parent dies
    (even by SIGKILL), so no worker outlives its cluster. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts the workers and, with `restart`, starts again any that exits."""

    def __init__(self, commands: list[list[str]], restart: bool):
        self.commands = commands
        self.restart = restart
        self.processes: list[subprocess.Popen] = []
        self.stopping = threading.Event()

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)

    def start(self) -> None:
        self.processes = [self._spawn(command) for command in self.commands]
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(0.5):
            for index, process in enumerate(self.processes):
                if process.poll() is not None and self.restart and not self.stopping.is_set():
                    print(f"worker {index} exited ({process.returncode}); starting it again",
                          file=sys.stderr, flush=True)
                    self.processes[index] = self._spawn(self.commands[index])

    def stop(self) -> None:
        self.stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-cluster MODEL [--workers N] [--replicas R] [--port] [--restart] [chaos]`"""
    import argparse

    from anyorder.serving.asgi import DEFAULT_HOST, bind, run, url_of
    from anyorder.serving.router import Router
    from anyorder.serving.service import ClusterBackend, Limits, create_app

    parser = argparse.ArgumentParser(prog="anyorder-cluster", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="export directory or models:/ URI")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2, help="hosts per block")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--select", default="random", choices=["random", "fastest"])
    parser.add_argument("--hop-timeout-ms", type=float, default=1000)
    parser.add_argument("--restart", action="store_true", help="restart workers that exit")
    parser.add_argument("--faulty", type=int, default=0, help="workers given the chaos flags")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--crash-after", type=int, default=0)
    parser.add_argument("--garbage-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        export_dir = resolve_source(args.model)
        depth = int(read_manifest(export_dir)["depth"])
        hosted = assign_blocks(depth, args.workers, args.replicas)
        router = Router(export_dir, hop_timeout_s=args.hop_timeout_ms / 1e3, select=args.select,
                        threads=1)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind(args.host, args.port)
    chaos = {key: getattr(args, key) for key in CHAOS_FLAGS}
    commands = [worker_command(str(export_dir), blocks, url_of(sock),
                               chaos=chaos if index < args.faulty else None, seed=index)
                for index, blocks in enumerate(hosted)]
    supervisor = Supervisor(commands, args.restart)
    for index, blocks in enumerate(hosted):
        print(f"worker {index}: blocks {blocks}", file=sys.stderr)
    supervisor.start()
    try:
        run(create_app(ClusterBackend(router), Limits()), sock)
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
