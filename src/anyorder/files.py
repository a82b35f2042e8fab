"""Writing files so that a crash never leaves half of one, and the same content gives the same bytes.

Every writer goes to a temporary file in the target's directory and renames it into place, so a
process killed mid-write leaves the previous file intact. Writers whose format would embed the
time of writing (numpy's .npz is a zip archive with a modification time per member) pin it, so
DVC sees identical outputs for identical inputs.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

# A fixed member time for zip-based formats: the earliest a zip archive can hold.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_csv(path: str | Path, rows: list[dict]) -> None:
    """A list of flat dicts (all with the keys of the first) as CSV, e.g. for DVC plots."""
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: Optional[dict[str, str]] = None
                        ) -> None:
    """torch tensors -> a safetensors file (bytes depend only on the tensors and metadata)."""
    from safetensors.torch import save_file  # torch-only: keep this module importable without it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a whole directory at once: yields an empty temporary sibling to fill; when the block
    ends without an error, it replaces `target` (the old one is moved aside first, so a failing
    swap puts it back); on any error it is removed and `target` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    backup = target.parent / f".{target.name}.old-{os.getpid()}"
    for leftover in (tmp, backup):  # from an earlier crashed run that had the same pid
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        tmp.mkdir()
        yield tmp
        had_old = target.exists()
        if had_old:
            os.rename(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            if had_old:
                os.rename(backup, target)
            raise
        if had_old:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone on success (renamed): this is for errors


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz archive (readable by np.load) whose bytes depend only on `arrays`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(paths: Iterable[str | Path], root: Optional[str | Path] = None) -> str:
    """sha256 over the names and contents of every file under `paths` (files or directories).

    Names are taken relative to `root` (default: the current directory), so the digest of a
    project does not depend on where the project lives. A missing path counts as absent, not
    as an error: the digest then differs from any digest taken while it existed.
    """
    root = Path(root or ".").resolve()
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        full = path if path.is_absolute() else root / path
        files = sorted(f for f in full.rglob("*") if f.is_file()) if full.is_dir() else [full]
        for file in files:
            name = os.path.relpath(file, root) if not path.is_absolute() else str(file)
            exists = file.is_file()
            digest.update(f"{name}\0{sha256_file(file) if exists else 'absent'}\n".encode())
    return digest.hexdigest()
