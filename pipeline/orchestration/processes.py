"""Process groups that leave nothing behind: the one implementation the flow, the scheduler, the
supervisor of `dvc` and the stages share.

- `die_with_parent()`: the kernel sends this process SIGTERM when the process that started it
  dies, however it dies (Linux PR_SET_PDEATHSIG); SIGTERM then unwinds like an exception.
- `stop_group(pgid)`: SIGTERM every process of a group, wait, SIGKILL what is left.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Iterable

PR_SET_PDEATHSIG = 1


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)  # SystemExit: finally blocks run, temporary files are removed


def die_with_parent(parent: int | None = None) -> None:
    """Turn SIGTERM into SystemExit, and have the kernel send SIGTERM when our parent dies.

    `parent`: the pid the parent had (read before any fork of ours could be reparented); if the
    parent is already gone (we have been adopted by another process), exit at once."""
    parent = os.getppid() if parent is None else parent
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(128 + signal.SIGTERM)


def group_members(pgid: int, exclude: Iterable[int] = ()) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc (Linux; [] elsewhere)."""
    if not os.path.isdir("/proc"):
        return []
    excluded, found = set(exclude), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in excluded:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(entry))
    return found


def stop_group(pgid: int, grace: float = 10.0, first: int = signal.SIGTERM,
               exclude: Iterable[int] = ()) -> None:
    """Send `first` to every process of group `pgid` (but `exclude`), wait up to `grace` seconds
    for them to go, then SIGKILL whatever is left."""
    excluded = set(exclude)
    if not os.path.isdir("/proc"):  # no way to list a group's members: signal it and hope
        try:
            os.killpg(pgid, first)
        except ProcessLookupError:
            pass
        return
    for pid in group_members(pgid, excluded):
        _signal(pid, first)
    deadline = time.monotonic() + grace
    while group_members(pgid, excluded) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in group_members(pgid, excluded):
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
