"""Plain helpers for the Prefect flow (no Prefect tasks or flows here): the DVC stage graph, `-S`
overrides, the schedule config (its cron checked by Prefect's own schedule model), the files an
experiment commit must include, and the local server's health check.

The DAG is read from DVC itself (`Repo.index.graph`), so stages added to dvc.yaml later are picked
up without editing the flow. Overrides use DVC's `-S key=value` form; values are YAML scalars.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from anyorder.config import ConfigError, load_settings

PARAMS_FILE = "params.yaml"

# No telemetry or version checks (this machine has no internet: a blocked call can hang), and
# Prefect's state under the project. Applied before Prefect is imported; the caller's env wins.
QUIET_ENV = {"PREFECT_HOME": str(Path(__file__).resolve().parents[1] / ".prefect"),
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
             "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def apply_quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


class ScheduleError(ValueError):
    """The schedule config is missing a key or holds a cron expression that does not parse."""


def stage_name(stage: Any, root: str | Path) -> str:
    """The name `dvc repro` takes (`stage.addressing`, but relative to root, not to the cwd)."""
    from dvc.stage import PipelineStage

    rel = os.path.relpath(stage.path, root)
    if isinstance(stage, PipelineStage):
        return stage.name if rel == "dvc.yaml" else f"{rel}:{stage.name}"
    return rel


def pipeline_graph(root: str | Path) -> tuple[list[str], set[tuple[str, str]]]:
    """Stages that `dvc repro` would run, in a stable topological order, and the edges between
    them as (upstream, downstream) pairs of stage names (as `dvc repro` takes, e.g. finetune@ls)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stage it depends on
        # Pure data sources (`dvc add`-ed files) have nothing to run; they have no deps, so
        # dropping them cuts no path between the stages that remain.
        keep = {s for s in graph.nodes if not s.is_data_source}
        names = {s: stage_name(s, root) for s in keep}
        edges = {(names[dep], names[s]) for s, dep in graph.edges if s in keep and dep in keep}
    order = nx.DiGraph()
    order.add_nodes_from(names.values())
    order.add_edges_from(edges)
    return list(nx.lexicographical_topological_sort(order)), edges


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["pretrain.epochs=1", ...]` -> `{"pretrain.epochs": 1}` (values read as YAML, like -S)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if key.startswith(f"{PARAMS_FILE}:"):
            key = key[len(PARAMS_FILE) + 1:]
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (like dvc exp run -S)")
        if ":" in key:
            raise ConfigError(f"override {item!r}: only {PARAMS_FILE} parameters can be set")
        try:
            overrides[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: value {value!r} is not a YAML scalar: {exc}") from None
    return overrides


def validate_params(root: str | Path, overrides: dict[str, Any]) -> None:
    """Raise ConfigError (naming the key) unless params.yaml with the overrides is valid."""
    load_settings(Path(root) / PARAMS_FILE, overrides)


def apply_overrides(root: str | Path, overrides: dict[str, Any]) -> None:
    """Write validated overrides into params.yaml, keeping its comments, as `dvc exp run -S`
    does in the workspace. A mapping value replaces the whole section (e.g. finetune.runs)."""
    if not overrides:
        return
    from dvc.utils.serialize import modify_yaml

    path = Path(root) / PARAMS_FILE
    tmp = path.with_name(f".{PARAMS_FILE}.flow-tmp")
    shutil.copyfile(path, tmp)
    with modify_yaml(str(tmp)) as data:
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    os.replace(tmp, path)  # all or nothing


def experiment_files(root: str | Path) -> list[str]:
    """Git-tracked files the stages write (non-cached metrics/plots, dvc.lock, .gitignore of
    out folders): what `dvc exp run` stages, and `dvc exp save` must be told to include."""
    from dvc.repo import Repo
    from dvc.stage.utils import _get_stage_files  # what `dvc exp run` itself stages per stage

    root = Path(root).resolve()
    files: set[str] = set()
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            # _get_stage_files gives paths relative to the cwd; make them relative to root
            files.update(os.path.relpath(os.path.abspath(f), root) for f in _get_stage_files(stage))
            for out in stage.outs:
                ignore = Path(out.fs_path).parent / ".gitignore"
                if out.use_scm_ignore and ignore.is_file():
                    files.add(os.path.relpath(ignore, root))
    return sorted(f for f in files if (root / f).exists())


def stage_outputs(root: str | Path, name: str) -> list[Path]:
    """Outputs of one stage that DVC deletes before running it (not `persist: true`)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if stage_name(stage, root) == name:
                return [Path(out.fs_path) for out in stage.outs if not out.persist]
    return []


def load_schedule(path: str | Path, cron: str | None = None) -> dict[str, Any]:
    """Read the schedule config; validate its cron (or `cron` given instead) as Prefect will."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ScheduleError(f"{path}: cannot read the schedule config: {exc}") from None
    missing = {"deployment", "cron"} - set(config)
    if missing:
        raise ScheduleError(f"{path}: missing key(s) {', '.join(sorted(missing))}")
    config["cron"] = str(cron if cron is not None else config["cron"])
    try:
        CronSchedule(cron=config["cron"], timezone=config.get("timezone") or "UTC")
    except ValidationError as exc:
        err = exc.errors()[0]
        what = ("timezone", "is not a known timezone") if err["loc"] == ("timezone",) else (
            "cron expression", "does not parse")
        value = config.get(what[0].split()[0])
        where = "--cron" if cron is not None and what[0] != "timezone" else str(path)
        raise ScheduleError(f"{where}: {what[0]} {value!r} {what[1]}: {err['msg']}") from None
    config["parameters"] = config.get("parameters") or {}
    parse_overrides(config["parameters"].get("set_params"))  # fail now, not at 2 a.m.
    return config


def api_url(config: dict[str, Any]) -> str:
    """The API address of the local Prefect server named in the schedule config."""
    server = config.get("server") or {}
    return f"http://{server.get('host', '127.0.0.1')}:{server.get('port', 4200)}/api"


def server_up(url: str) -> bool:
    """Whether a Prefect server answers its health check at this API address."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False
