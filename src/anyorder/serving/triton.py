"""A Triton model repository from an export: the same block graphs, laid out so that a Triton
Inference Server (or KServe's Triton runtime) can stand in for our workers.

    anyorder-triton-repo exports/ls_best triton_repo [--blocks 0,1,2]
    tritonserver --model-repository triton_repo          # on the cluster, not here

Each block becomes `<out>/block_XX/1/model.onnx` with a `config.pbtxt` (platform
onnxruntime_onnx, the batch axis dynamic, the same input and output names as our worker), so the
router talks to it exactly as to `anyorder-worker` (list it with `anyorder-serve --worker URL`).
Every file is checked against the manifest's sha256 as it is copied; the repository is written
to a temporary folder and renamed into place, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from anyorder.files import sha256_file
from anyorder.export.runtime import ExportError, parse_indices, read_manifest
from anyorder.export.sources import resolve_source
from anyorder.serving.worker import block_name


def block_config(name: str, tokens: Sequence[int], slotted: bool) -> str:
    """The config.pbtxt of one block (dims include the dynamic batch axis: max_batch_size 0)."""
    dims = ", ".join(str(d) for d in (-1, *tokens))
    inputs = [f'  {{ name: "tokens" data_type: TYPE_FP32 dims: [ {dims} ] }}']
    if slotted:
        inputs.append('  { name: "slot" data_type: TYPE_INT64 dims: [ 1 ] }')
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            'input [\n' + ",\n".join(inputs) + '\n]\n'
            f'output [\n  {{ name: "tokens_out" data_type: TYPE_FP32 dims: [ {dims} ] }}\n]\n')


def write_triton_repository(export_dir: Union[str, Path], out_dir: Union[str, Path],
                            blocks: Optional[Sequence[int]] = None) -> list[str]:
    """Lay out blocks (default: all) of an export as a Triton model repository at `out_dir`
    (which must not exist); return the model names written."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir}: already exists; name a new folder for the repository")
    entries = {int(e["index"]): e for e in manifest["graphs"]["blocks"]}
    chosen = sorted(entries) if blocks is None else sorted(set(int(b) for b in blocks))
    unknown = [b for b in chosen if b not in entries]
    if unknown or not chosen:
        raise ExportError(f"blocks {unknown or chosen}: this export has blocks {sorted(entries)}")
    tokens = (int(manifest["num_tokens"]), int(manifest["embed_dim"]))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for index in chosen:
            source = export_dir / entries[index]["file"]
            if not source.is_file() or sha256_file(source) != entries[index]["sha256"]:
                raise ExportError(f"{source}: missing, or changed since export (sha256 differs "
                                  f"from the manifest); export the model again")
            name = block_name(index)
            (staging / name / "1").mkdir(parents=True)
            shutil.copyfile(source, staging / name / "1" / "model.onnx")
            (staging / name / "config.pbtxt").write_text(
                block_config(name, tokens, bool(manifest.get("slot_input"))))
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [block_name(i) for i in chosen]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-triton-repo EXPORT OUT [--blocks 0,1]`"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="anyorder-triton-repo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("export", help="export directory or models:/ URI")
    parser.add_argument("out", help="the repository folder to create")
    parser.add_argument("--blocks", default="", help="block indices (default: all)")
    args = parser.parse_args(argv)
    try:
        names = write_triton_repository(resolve_source(args.export), args.out,
                                        parse_indices(args.blocks, "--blocks") or None)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
