"""The default pipeline's stages on this machine's device, without DVC: for a machine that has the
library's packages (torch, timm, onnx, onnxruntime) but not the orchestration (a lent GPU box).

    python bench/pipeline_device.py [--workers 4] [--skip register] [--deadline SECONDS]
                                    [--out FILE.json]

Reads dvc.yaml and params.yaml as `dvc repro` would (foreach stages expanded, each command
interpolated), orders the stages by what they read and write, and runs each command as DVC
would, in the project directory, up to `--workers` at a time (each told its share of the cores
through OMP_NUM_THREADS). MLflow is off (ANYORDER_TRACKING=off), so `register`, whose output is
MLflow's registry, is skipped. Every stage runs on `device: auto`, i.e. CUDA where torch sees a
GPU. Written: each stage's seconds, exit code and the end of its log on failure, and the
evaluation figures next to those committed in metrics/evaluate/ (the CPU run's), so a device's
run can be compared with the reference. Past `--deadline` no stage starts and the running ones
are stopped, and the report says which did not finish. It overwrites the pipeline's outputs in
this copy.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _report import header, write  # noqa: E402  (bench/_report.py)

import yaml  # noqa: E402

from pipeline.stage import _interpolate, foreach_entries  # noqa: E402  (dvc.yaml as stages read it)


def _paths(entries: list, key, item, params: dict) -> list[str]:
    """deps/outs/metrics/plots entries: a path, or {path: options}; interpolated, normalised."""
    paths = []
    for entry in entries or []:
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        paths.append(os.path.normpath(_interpolate(str(path), key, item, params)))
    return paths


def stages(dvc_yaml: Path, params: dict) -> dict[str, dict]:
    """name (or name@key) -> {cmd, deps, outs}, in dvc.yaml's order."""
    found = {}
    for name, entry in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        body = entry.get("do", entry)
        items = foreach_entries(entry, params) if "foreach" in entry else {None: None}
        for key, item in items.items():
            found[f"{name}@{key}" if key is not None else name] = {
                "cmd": _interpolate(body["cmd"], key, item, params),
                "deps": _paths(body.get("deps"), key, item, params),
                "outs": sum((_paths(body.get(f), key, item, params)
                             for f in ("outs", "metrics", "plots")), [])}
    return found


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def needs(graph: dict[str, dict]) -> dict[str, set[str]]:
    """For each stage, the stages whose outputs it reads (a dep inside an out, or the other way)."""
    return {name: {other for other, spec in graph.items() if other != name and any(
        _inside(dep, out) or _inside(out, dep) for dep in stage["deps"] for out in spec["outs"])}
        for name, stage in graph.items()}


def run_all(graph: dict[str, dict], workers: int, logs: Path,
            deadline: float = float("inf")) -> dict[str, dict]:
    """Run every stage once its inputs' stages have succeeded; a failed stage's dependants are
    not run, nor anything past `deadline` seconds. Returns name -> {seconds, returncode} or
    {skipped: why}."""
    begun = time.perf_counter()
    required = needs(graph)
    done: dict[str, dict] = {}
    running: dict[str, tuple] = {}
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "ANYORDER_TRACKING": "off", "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    while len(done) < len(graph):
        if time.perf_counter() - begun > deadline:
            for name, (process, started, log) in running.items():
                process.kill()
                process.wait()
                log.close()
                done[name] = {"skipped": f"stopped at the {deadline:.0f} s deadline"}
            running.clear()
            for name in graph:
                done.setdefault(name, {"skipped": f"not started by the {deadline:.0f} s deadline"})
            break
        for name in graph:
            if name in done or name in running:
                continue
            if any(done[r].get("returncode") != 0 for r in required[name] if r in done):
                done[name] = {"skipped": "an input's stage failed"}
                print(f"skip {name}: an input's stage failed", flush=True)
                continue
            if len(running) < workers and all(r in done for r in required[name]):
                command = shlex.split(graph[name]["cmd"])
                if command[0] in ("python", "python3"):
                    command[0] = sys.executable
                log = open(logs / f"{name.replace('@', '_')}.log", "w+")
                running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT), time.perf_counter(),
                                 log)
                print(f"start {name}", flush=True)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is not None:
                done[name] = {"seconds": round(time.perf_counter() - started, 1),
                              "returncode": process.returncode}
                if process.returncode:
                    log.seek(0)
                    done[name]["log_tail"] = log.read()[-3000:]
                log.close()
                print(f"done {name}: {done[name]['seconds']} s, exit {process.returncode}",
                      flush=True)
                del running[name]
        time.sleep(0.2)
    return {name: done[name] for name in graph}


def evaluation(folder: Path, since: float = 0.0) -> dict[str, dict]:
    """metrics/evaluate/*.json written after `since` -> {run: {sequential, arbitrary}} (test
    accuracy)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        if path.stat().st_mtime < since:
            continue
        data = json.loads(path.read_text())
        out[path.stem] = {"sequential": round(data["sequential"], 4),
                          "arbitrary": round(data["arbitrary"]["mean"], 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="stages run at once")
    parser.add_argument("--skip", nargs="*", default=["register"], help="stages not run")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after which no stage starts and running ones stop")
    parser.add_argument("--out", default=str(ROOT / "bench/results/pipeline_device.json"))
    args = parser.parse_args()
    import torch

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    graph = {name: spec for name, spec in stages(ROOT / "dvc.yaml", params).items()
             if name.partition("@")[0] not in args.skip}
    reference = evaluation(ROOT / "metrics/evaluate")  # the committed (CPU) run's figures
    logs = Path(tempfile.mkdtemp(prefix="stage-logs-"))
    since, started = time.time(), time.perf_counter()
    results = run_all(graph, args.workers, logs, args.deadline)
    wall = time.perf_counter() - started
    now = evaluation(ROOT / "metrics/evaluate", since)  # what this run's stages wrote
    report = {
        **header(torch=torch.__version__,
                 device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
        "workers": args.workers, "skipped": args.skip, "wall_s": round(wall, 1),
        "stages_ok": sum(r.get("returncode") == 0 for r in results.values()),
        "stages": results,
        "evaluation": {run: {"this_run": now.get(run), "committed": reference.get(run)}
                       for run in sorted(set(reference) | set(now))},
    }
    write(args.out, report)
    shutil.rmtree(logs, ignore_errors=True)
    failed = [n for n, r in results.items() if r.get("returncode", 1) != 0]
    print(f"{report['stages_ok']}/{len(results)} stages ran in {wall:.0f} s"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
