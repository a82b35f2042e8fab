"""Threads: how many a process computes with, for torch and for ONNX Runtime alike.

On a 2-core machine two processes that each take every core run far slower than one after the
other (a 15-second test fixture took 600 s beside another busy process), so every stage applies
`compute.threads` once, before computing: 0 means $OMP_NUM_THREADS if set, else all cores shared
evenly between the processes of a torchrun launch."""
from __future__ import annotations

import os
import sys


def threads_for(threads: int = 0) -> int:
    """`threads`; or (0) $OMP_NUM_THREADS when the environment sets it (torchrun, a test
    runner, a scheduler dividing a machine); or the cores divided by torchrun's local process
    count (at least 1)."""
    if threads > 0:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]):
        return int(os.environ["OMP_NUM_THREADS"])
    return cores_per_process(_local_processes())


def _local_processes() -> int:
    """The processes a torchrun launch starts on this machine (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def cores_per_process(processes: int) -> int:
    """This machine's cores shared evenly by `processes` processes (at least 1 each)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


_applied = 0  # the count apply_threads set (0: never called)
_loader_workers = None  # what apply_threads was given for data loading (None: automatic)


def apply_threads(threads: int = 0, loader_workers: int | None = None) -> int:
    """Use `threads_for(threads)` threads in torch (when imported) and in every ONNX Runtime
    session created from now on by this package (`session_threads`); return the number.
    `loader_workers`: the data loader processes a training run starts (`loader_workers`)."""
    global _applied, _loader_workers
    _applied = threads_for(threads)
    _loader_workers = loader_workers
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(_applied)
    return _applied


def session_threads() -> int:
    """Intra-op threads for a new ONNX Runtime session: what apply_threads set, else
    min(4, cores) (more rarely helps one small graph)."""
    return _applied or min(4, os.cpu_count() or 1)


def loader_workers(device_type: str) -> int:
    """Processes that read and collate training batches beside the one that computes: what
    apply_threads was given, else none on CPU (the computing process has every core and reading
    a batch of prepared images is a few positioned reads) and, on a GPU, this process's share
    of the cores less the one that drives the GPU, at most 8."""
    if _loader_workers is not None:
        return _loader_workers
    if device_type == "cpu":
        return 0
    return max(1, min(8, cores_per_process(_local_processes()) - 1))
