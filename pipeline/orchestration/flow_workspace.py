"""Workspace bookkeeping of a flow run: the check that no `dvc` command is working in the
workspace before the run starts, and params.yaml backed up before the run writes its overrides
into it, then put back after the run (or after a killed run, by the next one)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline import stage  # noqa: F401  (puts src/ on sys.path)
from pipeline.orchestration import dvc_graph as dg, workspace

from anyorder.files import sha256_file

PARAMS_BACKUP, PARAMS_WRITTEN = workspace.PARAMS_BACKUP, workspace.PARAMS_WRITTEN


def check_dvc_idle(root: Path) -> None:
    """WorkspaceBusy if a `dvc` command (a `dvc repro` typed by hand) works in this workspace.

    DVC holds its repo lock for its bookkeeping and lets go of it while a stage's command runs;
    the stage then holds DVC's read/write locks on its files (.dvc/tmp/rwlock, with its pid).
    Between the two, a running `dvc repro` is always visible."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    def busy(who: str) -> workspace.WorkspaceBusy:
        return workspace.WorkspaceBusy(f"{root}: {who} is running in this workspace (e.g. "
                                       f"`dvc repro` typed by hand); wait for it to finish")

    with Repo(str(root)) as repo:  # honours core.hardlink_lock; creates .dvc/tmp if missing
        try:
            repo.lock.lock()
        except LockError:
            raise busy("a dvc command") from None
        repo.lock.unlock()
        rwlock = Path(repo.tmp_dir) / "rwlock"
    try:
        held = json.loads(rwlock.read_text() or "{}") if rwlock.is_file() else {}
    except ValueError:
        held = {}
    infos = [info for locks in held.values() for entry in locks.values()
             for info in (entry if isinstance(entry, list) else [entry])]
    for info in infos:
        if alive(int(info.get("pid", 0))):
            raise busy(f"`{info.get('cmd', 'dvc')}` (pid {info['pid']})")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pid > 0
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def backup_params(root: Path) -> None:
    """Before overrides are written: the original params.yaml, to put back after the run."""
    (root / PARAMS_BACKUP).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / dg.PARAMS_FILE, root / PARAMS_BACKUP)


def record_written_params(root: Path) -> None:
    """After the overrides are written: what this run wrote (a killed run's leftover is put back
    only if params.yaml still holds exactly this, never over a user's later edit)."""
    (root / PARAMS_WRITTEN).write_text(sha256_file(root / dg.PARAMS_FILE))


def restore_params(root: Path, logger, crashed: bool = False) -> None:
    """Put the backed-up params.yaml back, unless params.yaml changed since the flow wrote it."""
    backup, written = root / PARAMS_BACKUP, root / PARAMS_WRITTEN
    if not backup.is_file():
        return
    current = root / dg.PARAMS_FILE
    ours = not written.is_file() or written.read_text() == sha256_file(current)
    if ours:
        os.replace(backup, current)
        logger.warning("params.yaml restored as it was before %s", "a flow run that was killed "
                       "before putting it back" if crashed else "this run's overrides")
    else:
        logger.warning("params.yaml changed after a killed flow run wrote its overrides into it; "
                       "keeping it as it is (the pre-run version was %s, now removed)", backup)
        backup.unlink()
    written.unlink(missing_ok=True)
