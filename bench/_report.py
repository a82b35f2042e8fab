"""What every benchmark's JSON under bench/results/ starts with (the command, the date, the
machine), and how it is written."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def header(**machine) -> dict:
    """{"command", "date", "machine"}: the machine's CPU, cores and Python, plus `machine`
    (library versions, device, threads)."""
    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), **machine},
    }


def write(path, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")
