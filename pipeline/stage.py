"""Stage plumbing shared by every entry point: arguments, settings, what dvc.yaml declares, the
workspace lock, error exits, output paths, the inputs several stages read and check, and the
stage's MLflow run. Anything that computes lives in the library; what stages write and log
beyond a line or two is in pipeline.outputs.

A stage script (pipeline/stages/<stage>.py, run as `python -m pipeline.stages.<stage>`) reads:

    stage = begin(__doc__, "evaluate", foreach="run")   # evaluate@<run>, --run <run>
    with user_errors():
        ...checks that need no compute (bad input: exit 2, nothing written)...
    with track(stage, params) as mlflow:                 # MLflow checked before any compute
        ...compute, write outputs, mlflow.log_metrics(...)...

`begin` refuses, with exit code 2 and a message naming the key, file or run: a bad params.yaml,
a run name not in params, a malformed ANYORDER_PIPELINE_RUN_ID, a workspace held by a running
Prefect flow. From then on the settings raise if the stage reads a key its dvc.yaml entry does
not declare, so `dvc repro` can never keep outputs that depend on an undeclared setting.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

from pipeline import env

env.apply()
# Use the library next to this file, not whichever copy is installed: under `dvc exp run --temp`
# or in a copy of the project, the code DVC hashed as a dependency is the code that must run.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.orchestration import workspace  # noqa: E402
from pipeline.orchestration.processes import die_with_parent  # noqa: E402
from anyorder.config import Settings, load_settings  # noqa: E402
from anyorder.errors import InputError  # noqa: E402
from anyorder.files import tree_digest  # noqa: E402


def project_root(stage_file: Optional[Path] = None) -> Path:
    """The project directory (also under `dvc exp run --temp`, which runs in .dvc/tmp/exps/...)."""
    root = str(Path(stage_file or __file__).resolve().parents[1])
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    return Path(root.split(marker)[0]) if marker in root else Path(root)



# Outputs, relative to the directory DVC runs stages in (the project, or a temp experiment copy).
PREPARED = Path("data/prepared")
PRETRAINED = Path("models/pretrain")
EXPORTS = Path("exports")
NULLSPACE = Path("models/nullspace")
MERGED = Path("models/merged")
CORRUPTED = Path("data/corrupted")
WEIGHTS_DIR = Path("models/weights")  # local pre-trained weights: a dependency of pretrain
METRICS = Path("metrics")
PLOTS = Path("plots")

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Stop the stage with `error: message` on stderr (2 = bad input, nothing was computed)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad settings or data found inside the block stop the stage with exit 2 and its message."""
    try:
        yield
    except (InputError, workspace.WorkspaceBusy) as exc:
        fail(str(exc))


def read_json(path: Path, written_by: str) -> dict:
    """A JSON file an earlier stage wrote; exit 2 naming it (and that stage) if it is missing
    or not JSON."""
    import json
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: no such file; the {written_by} stage writes it (dvc repro runs it first)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        fail(f"{path}: not valid JSON ({exc}); run the {written_by} stage again")


def read_jsons(folder: Path, names, written_by: str) -> dict:
    """{name: folder/<name>.json} for every name (read_json; `written_by` names the stage that
    writes them, `{}` standing for the name)."""
    return {name: read_json(folder / f"{name}.json", written_by.format(name)) for name in names}


def require_model(path, what: str) -> None:
    """Exit 2 unless `path` holds a model (model.json); `what`: the setting that names it."""
    if not (Path(path) / "model.json").is_file():
        fail(f"{what} holds no model (model.json): run the stage that writes it first")


def load_corrupted(settings) -> dict[str, np.ndarray]:
    """The corrupted test sets the corrupt stage wrote, checked against the settings."""
    cfg = settings.robustness.corruptions
    manifest = read_json(CORRUPTED / "manifest.json", "corrupt")
    if manifest.get("severities") != list(cfg.severities) or not set(cfg.names) <= set(
            manifest.get("names", [])):
        fail(f"{CORRUPTED} holds {manifest.get('names')} at severities "
             f"{manifest.get('severities')}, not what robustness.corruptions asks for; run the "
             f"corrupt stage again (dvc repro corrupt)")
    out = {}
    for name in cfg.names:
        with np.load(CORRUPTED / f"{name}.npz", allow_pickle=False) as archive:
            out[name] = archive["x"]
    return out


# -- what dvc.yaml declares ------------------------------------------------------------------------

def _interpolate(text: str, key: Optional[str], item: Any, params: dict) -> str:
    """DVC's `${key}` / `${item.field}` (foreach) and `${dotted.param}` in a dvc.yaml string."""
    def value(match: re.Match) -> str:
        name = match.group(1).strip()
        if name == "key" and key is not None:
            return key
        head, _, rest = name.partition(".")
        node: Any = item if head == "item" and item is not None else params
        for part in (rest.split(".") if node is item else name.split(".")):
            if part:
                node = node[part]
        return str(node)
    return re.sub(r"\$\{([^}]+)\}", value, text)


def foreach_entries(entry: dict, params: dict) -> dict:
    """The mapping a dvc.yaml foreach stage expands (`foreach: ${finetune.runs}`: its entries;
    a list, as DVC does, by value: `${item}` is the value)."""
    mapping: Any = params
    for part in entry["foreach"].strip("${} ").split("."):
        mapping = mapping[part]
    return {str(value): value for value in mapping} if isinstance(mapping, list) else mapping


def declared(stage: str, field: str, params: dict, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The `params` or `deps` entries of a stage (`name` or `name@key`), interpolated."""
    name, _, key = stage.partition("@")
    entry = yaml.safe_load(dvc_yaml.read_text())["stages"][name]
    body = entry.get("do", entry)
    item = foreach_entries(entry, params)[key] if "foreach" in entry and key else None
    items: list[str] = []
    for element in body.get(field, []):
        if isinstance(element, dict):  # {params-file: [keys]}; only params.yaml is used here
            items += [k for f, keys in element.items() if f == "params.yaml" for k in keys]
        else:
            items.append(element)
    return [_interpolate(str(element), key or None, item, params) for element in items]


def declared_paths(stage: "Stage") -> list[Path]:
    """The stage's declared dependencies as paths: where a setting may point the stage."""
    return [Path(d) for d in declared(stage.name, "deps", stage.raw_params)]


def inputs_digest(stage: "Stage") -> str:
    """sha256 of every file the stage declares as a dependency (its code, data, start weights):
    resume state written before any of them changed is not this run's."""
    return tree_digest(declared(stage.name, "deps", stage.raw_params))


# -- starting a stage ------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str                 # as `dvc repro` names it: "prepare", "evaluate@ls_s0"
    args: argparse.Namespace
    settings: Settings        # restricted to the params the stage declares
    raw_params: dict          # params.yaml as parsed, for logging what the stage declares
    params_path: str


# foreach stages: the command-line flag naming the entry, and the settings mapping it lives in.
FOREACH = {"run": ("finetune", "runs"), "model": ("export", "models"), "arm": ("nullspace", "arms"),
           "name": ("merge", "models")}


STAGE_ARGV = "ANYORDER_STAGE_ARGV"


def begin(description: str, name: str, foreach: Optional[str] = None) -> Stage:
    """Parse the stage's arguments and load its settings; exit 2 on bad input (see module doc).

    foreach: for a foreach stage, the flag naming its entry ("run": --run, an entry of
    finetune.runs; "model": --model, an entry of export.models); the stage is then name@entry.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    if foreach:
        section, field_name = FOREACH[foreach]
        parser.add_argument(f"--{foreach}", required=True,
                            help=f"name of an entry of {section}.{field_name}")
    # A stage relaunched under torchrun (train nproc > 1) gets its arguments from the
    # environment (see outputs.relaunch_under_torchrun).
    argv = json.loads(os.environ[STAGE_ARGV]) if STAGE_ARGV in os.environ else None
    args = parser.parse_args(argv)
    # If dvc (run by a Prefect task) is killed, stop too: no orphaned stage keeps computing.
    die_with_parent()
    entry = getattr(args, foreach) if foreach else None
    stage_name = f"{name}@{entry}" if foreach else name
    with user_errors():
        workspace.check_stage_may_run(Path.cwd())
        settings = load_settings(args.params)
        if foreach:
            known = getattr(getattr(settings, section), field_name)
            if entry not in known:
                fail(f"{section}.{field_name} has no entry {entry!r} (known: {', '.join(known)})")
        run_id = os.environ.get("ANYORDER_PIPELINE_RUN_ID")
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            fail(f"ANYORDER_PIPELINE_RUN_ID={run_id!r}: use 1-200 letters, digits and . _ : @ + - "
                 f"(it is matched in MLflow searches), e.g. nightly-2026-11-23")
    raw = yaml.safe_load(Path(args.params).read_text()) or {}
    # `mlflow.*` says where runs are mirrored, never what a stage computes: not a dependency.
    params = declared(stage_name, "params", raw)
    settings.restrict_to(params + ["mlflow"], stage_name)
    if "compute" in params:  # the stages that compute declare it; the others never read it
        from anyorder.threads import apply_threads
        apply_threads(settings.compute.threads, settings.compute.loader_workers)
    return Stage(stage_name, args, settings, raw, args.params)


def declared_values(stage: Stage) -> dict[str, Any]:
    """The declared params of the stage and their values, flattened (`finetune.train.lr`: 0.001)."""
    out: dict[str, Any] = {}
    for key in declared(stage.name, "params", stage.raw_params):
        node: Any = stage.raw_params
        for part in key.split("."):
            node = (node or {}).get(part) if isinstance(node, dict) else None
        _flatten(key, node, out)
    return out


def _flatten(prefix: str, value: Any, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, out)
    else:
        out[prefix] = value
    return out


# -- MLflow ----------------------------------------------------------------------------------------

def tracking_uri(settings: Settings, root: Optional[Path] = None) -> str:
    """Settings, else $MLFLOW_TRACKING_URI, else a SQLite store at the project root (`root`, by
    default this file's project). The Prefect flow asks the same, so both sides agree."""
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    store = (root or project_root()) / "mlflow.db"
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}"


def pipeline_run_id(params_path: str) -> str:
    """Groups the stage runs of one pipeline run.

    The Makefile and the Prefect flow set ANYORDER_PIPELINE_RUN_ID per run (checked by `begin`).
    A bare `dvc repro` falls back to the parameters' hash, so stages run with the same settings
    group together.
    """
    import hashlib
    explicit = os.environ.get("ANYORDER_PIPELINE_RUN_ID")
    if explicit:
        return explicit
    return f"params-{hashlib.sha256(Path(params_path).read_bytes()).hexdigest()[:12]}"


class Tracker:
    """The stage's MLflow run. MLflow mirrors what DVC tracks, so once the run is open a failing
    call is a warning, not a failed stage: the outputs are written either way, and the warning
    says MLflow missed the rest of this run. Calls: log_params, log_metrics, log_metric,
    log_dict, log_artifact, log_artifacts, set_tag (as in `mlflow`; they return nothing)."""

    def __init__(self, stage: str, backend):
        self.stage, self.backend, self.broken = stage, backend, False

    def __getattr__(self, name: str):
        def guarded(*args, **kwargs):
            if self.broken:
                return None
            try:
                return self.backend.call(name, *args, **kwargs)
            except tracking.CallFailed as exc:
                self.broken = True
                warnings.warn(f"{self.stage}: MLflow stopped answering ({exc}); the stage goes "
                              f"on and writes its outputs, but MLflow misses the rest of this "
                              f"run", stacklevel=2)
        return guarded


def require_mlflow(stage: Stage) -> None:
    """Exit 2 if MLflow is switched off (ANYORDER_TRACKING=off): for a stage whose output is
    in MLflow itself (the registry)."""
    if tracking.tracking_off():
        fail(f"{stage.name} writes into MLflow itself and MLflow is off "
             f"({tracking.OFF}={os.environ[tracking.OFF]}); unset {tracking.OFF} (MLflow must "
             f"be installed) to run it. Nothing was computed.")


@contextmanager
def track(stage: Stage, extra_params: Optional[dict] = None, writes_mlflow: bool = False
          ) -> Iterator[Tracker]:
    """An MLflow run for the stage, nested under its pipeline run's parent, with the stage's
    declared params logged. Opened here, before the stage computes: an unreachable or broken
    store stops the stage (exit 2, nothing written). Later failures: see `Tracker`.
    `writes_mlflow`: the stage's output is in MLflow itself (the registry), so it refuses to run
    with MLflow switched off."""
    uri = tracking_uri(stage.settings)
    group = pipeline_run_id(stage.params_path)
    tags = {"anyorder.pipeline_run_id": group}
    if os.environ.get("ANYORDER_PREFECT_FLOW_RUN_ID"):
        tags["prefect.flow_run_id"] = os.environ["ANYORDER_PREFECT_FLOW_RUN_ID"]
    if writes_mlflow:
        require_mlflow(stage)
    mlflow = tracking.backend()
    try:
        mlflow.open(uri=uri, experiment=stage.settings.mlflow.experiment, group=group,
                    tags=tags, stage=stage.name, root=str(project_root()))
    except tracking.TrackingUnavailable as exc:
        fail(f"MLflow tracking store {uri} cannot be used ({exc}); "
             f"start it, or point mlflow.tracking_uri in params.yaml (or MLFLOW_TRACKING_URI) at "
             f"a store that works. Nothing was computed.")
    tracker = Tracker(stage.name, mlflow)
    status = "FAILED"
    try:
        params = {**declared_values(stage), **(extra_params or {})}
        if params:
            tracker.log_params({k: str(v)[:500] for k, v in params.items()})
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end_run(status=status)
