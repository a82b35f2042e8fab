"""The one place the project's quiet environment is defined: no telemetry, no version checks,
Prefect's state inside the project. This machine has no internet, and a blocked call home can
hang a stage, so everything the project runs applies it first (values the caller set win).

    python pipeline/env.py COMMAND [ARGS...]   run a command in that environment (the Makefile
                                               wraps dvc and mlflow with it)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Logging must not wait on a background queue that outlives the stage.
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    # An unreachable tracking server fails in seconds, not after minutes of back-off.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "PREFECT_HOME": str(ROOT / ".prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply() -> None:
    """Set every quiet variable the caller has not set. Call before importing Prefect/MLflow."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    apply()
    os.execvp(sys.argv[1], sys.argv[1:])
