"""Run a command so that nothing it starts can outlive the caller.

    python pipeline/orchestration/supervise.py COMMAND [ARGS...]

Started as the leader of a new process group (the caller passes start_new_session=True), this
process runs COMMAND in the same group and waits for it. When the caller dies, however it dies
(the kernel sends SIGTERM: PR_SET_PDEATHSIG), or when this process gets SIGTERM/SIGINT, the
whole group is stopped: SIGTERM, then SIGKILL for what is still there after a grace period. When
COMMAND ends on its own, whatever it left running in the group is stopped too. The Prefect flow
runs `dvc` through it: a DVC stage's own children are in the group as well, so a cancelled or
killed flow run leaves no stage computing and no DVC lock held.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: `pipeline` beside

from pipeline.orchestration.processes import die_with_parent, group_members, stop_group  # noqa: E402

GRACE_SECONDS = 10.0


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit(__doc__)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    # Handlers first: a caller dying from here on only sets the flag, never kills us half-way.
    parent = os.getppid()
    signal.signal(signal.SIGINT, on_signal)
    die_with_parent(parent)
    signal.signal(signal.SIGTERM, on_signal)
    child = subprocess.Popen(argv)
    while child.poll() is None and not stopping:
        time.sleep(0.1)
    me = os.getpid()
    if stopping:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_group(os.getpgrp(), GRACE_SECONDS, exclude=[me])
        child.wait()
        return 128 + signal.SIGTERM
    if group_members(os.getpgrp(), exclude=[me]):  # COMMAND left something running: stop it
        stop_group(os.getpgrp(), 2.0, exclude=[me])
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
