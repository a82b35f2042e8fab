"""One pipeline run at a time per workspace.

A Prefect flow run rewrites params.yaml and runs stage after stage; a second flow run, or a
`dvc repro` typed in between, would mix two runs' settings and outputs. The flow run therefore
holds an exclusive lock on `.anyorder/workspace.lock` (flock: the kernel drops it when the holder
dies, however it dies) and writes who holds it into the file. Stages check it: a stage started by
the holder (same flow-run id in its environment) goes on; any other is refused with a message
naming the holder. `dvc exp run --temp` runs in its own directory and is not affected.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

LOCK_FILE = Path(".anyorder/workspace.lock")
OWNER_ENV = "ANYORDER_PREFECT_FLOW_RUN_ID"
# A flow run with overrides keeps the original params.yaml here until it puts it back.
PARAMS_BACKUP = Path(".anyorder/params.yaml.before-flow-run")
PARAMS_WRITTEN = Path(".anyorder/params.yaml.flow-wrote.sha256")


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace; the message names it."""


def _describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return (f"Prefect flow run {owner.get('flow_run_id') or '?'} (pid {owner.get('pid', '?')}, "
            f"since {since})")


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def exclusive(root: str | Path, flow_run_id: str) -> Iterator[None]:
    """Hold the workspace for a flow run; WorkspaceBusy at once if someone else holds it."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(
                f"{Path(root).resolve()}: {_describe(_read_owner(path))} is running the pipeline "
                f"in this workspace; wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"flow_run_id": flow_run_id, "pid": os.getpid(),
                                 "since": time.time()}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def check_stage_may_run(root: str | Path, environ: Optional[dict] = None) -> None:
    """WorkspaceBusy unless the workspace is free or held by the flow run that started us.

    In a free workspace where a killed flow run left its overrides in params.yaml, warn (on
    stderr): the stage runs with them, and the next flow run puts the original back."""
    path = Path(root) / LOCK_FILE
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if (Path(root) / PARAMS_BACKUP).is_file():
                print(f"warning: params.yaml holds the overrides of a flow run that was killed "
                      f"before putting it back; the original is {PARAMS_BACKUP} (the next flow "
                      f"run restores it, or copy it over params.yaml yourself)", file=sys.stderr)
            return  # nobody holds it
        except BlockingIOError:
            pass
    owner = _read_owner(path)
    mine = (environ if environ is not None else os.environ).get(OWNER_ENV)
    if mine and owner.get("flow_run_id") == mine:
        return
    raise WorkspaceBusy(f"{_describe(owner)} is running the pipeline in this workspace; a stage "
                        f"started outside it would mix two runs' settings and outputs. Wait for "
                        f"it to finish, or use `dvc exp run --temp` to run beside it")
