"""Plain helpers for the Prefect flow (no Prefect tasks or flows here): the DVC stage graph, `-S`
overrides, the schedule config (every key checked; its cron by Prefect's own schedule model), the
files an experiment commit must include, and the local server's health check.

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

from anyorder.config import load_settings
from anyorder.settings import ConfigError

PARAMS_FILE = "params.yaml"


class ScheduleError(ValueError):
    """The schedule config has a missing, unknown or bad key; the message names it."""


# Flow parameters a schedule config (or the command line) may set, and a check for each value.
def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _non_negative_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")


FLOW_PARAMETERS: dict[str, tuple[Any, str]] = {
    "set_params": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                   "a list of key=value strings"),
    "force": (lambda v: isinstance(v, bool), "true or false"),
    "retries": (_non_negative_int, "an integer >= 0"),
    "retry_delay_seconds": (_non_negative_number, "a number of seconds >= 0"),
    "save_exp": (lambda v: isinstance(v, bool), "true or false"),
    "project_dir": (lambda v: isinstance(v, str) and Path(v).is_dir(), "an existing directory"),
    "skip_if_late_seconds": (lambda v: v is None or _non_negative_number(v),
                             "a number of seconds >= 0, or null"),
}
SERVER_KEYS = {"host": (lambda v: isinstance(v, str) and v.strip() != "", "a host name or address"),
               "port": (lambda v: _non_negative_int(v) and 1 <= v <= 65535,
                        "an integer in 1..65535")}
TOP_KEYS = {"deployment", "cron", "timezone", "parameters", "server"}


def _check_keys(values: Any, checks: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ScheduleError(f"{where}: must be a mapping, got {values!r}")
    for key, value in values.items():
        if key not in checks:
            raise ScheduleError(f"{where}.{key}: unknown key (known: {', '.join(checks)})")
        ok, what = checks[key]
        if not ok(value):
            raise ScheduleError(f"{where}.{key}: must be {what}, got {value!r}")


def check_flow_parameters(parameters: dict, where: str) -> None:
    """ScheduleError naming the key unless every flow parameter is known and valid."""
    _check_keys(parameters, FLOW_PARAMETERS, f"{where}: parameters")


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
    """`["pretrain.train.epochs=1", ...]` -> `{"pretrain.train.epochs": 1}` (values read as YAML, like -S)."""
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
    """Read the schedule config and check every key (the cron, or `cron` given instead, as
    Prefect will parse it); ScheduleError naming the first bad one."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ScheduleError(f"{path}: cannot read the schedule config: {exc}") from None
    if not isinstance(config, dict):
        raise ScheduleError(f"{path}: must be a mapping of keys, got {config!r}")
    missing = {"deployment", "cron"} - set(config)
    if missing:
        raise ScheduleError(f"{path}: missing key(s) {', '.join(sorted(missing))}")
    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise ScheduleError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(config["deployment"], str) or not config["deployment"].strip():
        raise ScheduleError(f"{path}: deployment: must be a name, got {config['deployment']!r}")
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
    check_flow_parameters(config["parameters"], str(path))
    _check_keys(config.get("server") or {}, SERVER_KEYS, f"{path}: server")
    try:
        parse_overrides(config["parameters"].get("set_params"))  # fail now, not at 2 a.m.
    except ConfigError as exc:
        raise ScheduleError(f"{path}: parameters.set_params: {exc}") from None
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
