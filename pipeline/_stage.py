"""What every stage entry point shares: argument parsing, settings, paths and MLflow tracking.

Stage scripts stay thin: they parse `--params`, call library functions with explicit arguments,
and write their outputs. All MLflow use lives here (the library never imports it).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

# Nothing may phone home: this machine has no internet and a blocked call can hang a stage.
for _name, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                      "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}.items():
    os.environ.setdefault(_name, _value)

# Use the library next to this file, not whichever copy is installed: under `dvc exp run --temp`
# or in a copy of the project, the code DVC hashed as a dependency is the code that must run.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anyorder.config import ConfigError, Settings, load_settings  # noqa: E402


def project_root(stage_file: Optional[Path] = None) -> Path:
    """The project directory (also under `dvc exp run --temp`, which runs in .dvc/tmp/exps/...)."""
    root = str(Path(stage_file or __file__).resolve().parents[1])
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    return Path(root.split(marker)[0]) if marker in root else Path(root)


# Paths of the pipeline's files, relative to the working directory DVC runs stages in.
PREPARED = Path("data/prepared")
PRETRAINED = Path("models/pretrain")
FINETUNED = Path("models/finetune")
METRICS = Path("metrics")
PLOTS = Path("plots")
STATE = Path(".anyorder/state")  # resumable training state; outside DVC outs, which DVC wipes


def parse_args(description: str, with_run: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    if with_run:
        parser.add_argument("--run", required=True, help="name of a run under finetune.runs")
    return parser.parse_args()


def settings_or_exit(params_path: str) -> Settings:
    """Load and validate params; a bad value stops here, before any compute, naming the key."""
    try:
        return load_settings(params_path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_or_exit(settings: Settings, run_name: str):
    runs = settings.finetune.runs
    if run_name not in runs:
        print(f"error: finetune.runs has no run {run_name!r} (known: {', '.join(runs)})",
              file=sys.stderr)
        raise SystemExit(2)
    return runs[run_name]


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """Atomically write a list of flat dicts as CSV (DVC plots read it)."""
    import csv
    import io

    from anyorder.checkpoint import atomic_write_bytes
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


# -- MLflow -----------------------------------------------------------------------------------------

def tracking_uri(settings: Settings, root: Optional[Path] = None) -> str:
    """Settings, else $MLFLOW_TRACKING_URI, else a SQLite store at the project root (`root`, by
    default this file's project). The Prefect flow asks the same, so both sides agree."""
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    store = (root or project_root()) / "mlflow.db"
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}"


def pipeline_run_id(params_path: str) -> str:
    """Groups the stage runs of one pipeline run.

    The Makefile and the Prefect flow set ANYORDER_PIPELINE_RUN_ID per run. A bare `dvc repro`
    falls back to the parameters' hash, so stages run with the same settings group together.
    """
    explicit = os.environ.get("ANYORDER_PIPELINE_RUN_ID")
    if explicit:
        return explicit
    digest = hashlib.sha256(Path(params_path).read_bytes()).hexdigest()[:12]
    return f"params-{digest}"


def _flatten(prefix: str, value: Any, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


@contextmanager
def mlflow_stage(stage: str, settings: Settings, params_path: str,
                 params: Optional[dict] = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under its pipeline run's parent; yields `mlflow`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(settings))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    if experiment is None:
        artifacts = (project_root() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(settings.mlflow.experiment, artifacts)
    else:
        experiment_id = experiment.experiment_id
    group = pipeline_run_id(params_path)
    tags = {"anyorder.pipeline_run_id": group}
    flow_run = os.environ.get("ANYORDER_PREFECT_FLOW_RUN_ID")
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    parent = client.search_runs([experiment_id], filter_string=(
        f"tags.`anyorder.pipeline_run_id` = '{group}' and tags.`anyorder.role` = 'pipeline'"),
        max_results=1)
    if parent:
        parent_id = parent[0].info.run_id
    else:
        parent_id = client.create_run(experiment_id, run_name=f"pipeline {group}",
                                      tags={**tags, "anyorder.role": "pipeline"}).info.run_id
        client.set_terminated(parent_id)
    tags.update({"anyorder.role": "stage", "anyorder.stage": stage, "mlflow.parentRunId": parent_id})
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags):
        flat = _flatten("", params or {}, {})
        if flat:
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_dict(settings.to_dict(), "settings.json")
        yield mlflow


def file_digest(path: Path) -> str:
    """sha256 of a file: ties resumable training state to the exact inputs it was started from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_spec(settings: Settings, class_names: list[str], variant: str):
    """The ModelSpec of this pipeline's model: timm arch + overrides, normalised as timm says."""
    import timm

    from anyorder.model import ModelSpec
    m = settings.model
    pretrained_cfg = timm.models.get_pretrained_cfg(m.arch)
    mean = tuple(pretrained_cfg.mean) if pretrained_cfg else (0.5, 0.5, 0.5)
    std = tuple(pretrained_cfg.std) if pretrained_cfg else (0.5, 0.5, 0.5)
    return ModelSpec(arch=m.arch, num_classes=len(class_names), img_size=settings.data.image_size,
                     variant=variant, patch_size=m.patch_size, embed_dim=m.embed_dim,
                     depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                     drop_path_rate=m.drop_path_rate,
                     position_embedding_dim=m.position_embedding_dim, mean=mean, std=std,
                     class_names=list(class_names))


def train_and_save(stage: str, settings: Settings, params_path: str, model, cfg, seed: int,
                   out_dir: Path, state_name: str, log_params: dict, fingerprint_extra: str = ""):
    """Train with resume state under .anyorder/state, save the model + history, log to MLflow."""
    import shutil
    from dataclasses import asdict

    from anyorder.checkpoint import atomic_write_json, save_model
    from anyorder.data import load_split
    from anyorder.train import train_model

    train_data, val_data = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    state_dir = STATE / state_name
    with mlflow_stage(stage, settings, params_path, log_params) as mlflow:
        def log_epoch(epoch: int, record: dict) -> None:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)

        result = train_model(model, train_data, val_data, cfg, seed, state_dir=state_dir,
                             fingerprint_extra=fingerprint_extra, on_epoch_end=log_epoch)
        extra = {"training": {"config": asdict(cfg), "seed": seed,
                              "resumed_from_epoch": result.resumed_from_epoch,
                              "final": result.history[-1]}}
        save_model(model, out_dir, extra)
        atomic_write_json(out_dir / "train_orders.json",
                          {"seed": seed, "order_sampling": cfg.order_sampling,
                           "orders": result.orders})
        write_rows_csv(PLOTS / "train" / f"{state_name}.csv", result.history)
        mlflow.log_metric("train_seconds", result.seconds)
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: nothing left to resume
    return result
