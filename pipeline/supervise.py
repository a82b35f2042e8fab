"""Run a command so that nothing it starts can outlive the caller.

    python pipeline/supervise.py COMMAND [ARGS...]

Started as the leader of a new process group (the caller passes start_new_session=True), this
process runs COMMAND in the same group and waits for it. When the caller dies, however it dies
(the kernel sends SIGTERM: PR_SET_PDEATHSIG), or when this process gets SIGTERM/SIGINT, the
whole group is stopped: SIGTERM, then SIGKILL for what is still there after a grace period.
The Prefect flow runs `dvc` through it: a DVC stage's own children are in the group too, so a
cancelled or killed flow run leaves no stage computing and no DVC lock held.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 10.0


def _others_in_group() -> list[int]:
    """The live processes of our process group, other than this one."""
    group, me, found = os.getpgrp(), os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(pgrp) == group and state != "Z":
            found.append(int(entry))
    return found


def stop_group(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every other process of our group, then SIGKILL what is left after `grace`."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches us too
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _others_in_group() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _others_in_group():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit(__doc__)
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: told when the caller dies
    child = subprocess.Popen(argv)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if os.getppid() == 1:  # the caller died before prctl took effect
        stopping = True
    while child.poll() is None and not stopping:
        time.sleep(0.1)
    if stopping:
        stop_group()
        child.wait()
        return 128 + signal.SIGTERM
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
