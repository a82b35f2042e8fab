"""`anyorder-run`: classify image files with any order of an export's blocks, from the command
line (an export directory or an MLflow model URI; see `anyorder.export.runtime`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from anyorder.export.runtime import (PROVIDERS, BlockRuntime, ExportError, MissingBlocksError,
                                     Policy, parse_indices)
from anyorder.export.sources import resolve_source


def _collect_images(paths: Sequence[str], class_names: list[str]
                    ) -> tuple[list[Path], Optional[list[int]]]:
    """Image files from files, folders of images, or one ImageFolder tree (sub-folders named
    after the model's classes: then their labels too, for an accuracy)."""
    from anyorder.data.images import IMAGE_EXTENSIONS

    def images_in(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir()
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                      and not f.name.startswith("."))

    if len(paths) == 1 and Path(paths[0]).is_dir():
        root = Path(paths[0])
        classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if classes and not images_in(root):
            unknown = [d.name for d in classes if d.name not in class_names]
            if unknown:
                raise ExportError(f"{root}: sub-folders {unknown} are not classes of this model "
                                  f"({', '.join(class_names)})")
            files, labels = [], []
            for folder in classes:
                found = images_in(folder)
                files += found
                labels += [class_names.index(folder.name)] * len(found)
            return files, labels
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += images_in(path)
        elif path.is_file():
            files.append(path)
        else:
            raise ExportError(f"{path}: no such file or folder")
    if not files:
        raise ExportError(f"no image files in {', '.join(paths)}")
    return files, None


def _parser() -> argparse.ArgumentParser:
    """The arguments of `main`."""
    parser = argparse.ArgumentParser(prog="anyorder-run", description=main.__doc__.split(":")[0])
    parser.add_argument("model", help="export directory (exports/<model>) or MLflow model URI "
                                      "(models:/<name>@champion)")
    parser.add_argument("images", nargs="+", help="image files, folders of images, or one "
                                                  "ImageFolder tree (then the accuracy is printed)")
    parser.add_argument("--order", default="sequential",
                        help="sequential, random, or block indices such as 3,0,2 (default: "
                             "sequential)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --order random")
    parser.add_argument("--policy", default="skip", help="missing blocks: skip, fail or "
                                                         "min_blocks:K (default: skip)")
    parser.add_argument("--exclude", default="", help="blocks to treat as missing, e.g. 2,5")
    parser.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resize", action="store_true",
                        help="resize images of another size to the model's (default: refuse them)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _classify(runtime: BlockRuntime, files: list[Path], executed: list[int], policy: Policy,
              batch_size: int, resize: bool) -> list[int]:
    """Predicted class indices of `files`, read in batches of `batch_size` and run through the
    blocks of `executed` (a progress bar on a terminal when there is more than one batch)."""
    from anyorder.data.images import DataError, read_image

    size = int(runtime.manifest["image_size"])
    predictions = []
    bar = None
    if sys.stderr.isatty() and len(files) > batch_size:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(files), unit="img", desc="classifying")
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        try:
            batch = np.stack([read_image(f, size, resize) for f in chunk])
        except DataError as exc:
            raise ExportError(str(exc)) from None
        predictions += runtime.predict(batch, executed, policy=policy).predictions.tolist()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return predictions


def _print_report(report: dict, count: int) -> None:
    """The human-readable form of `main`'s report: the order run, one line per file, and the
    accuracy over `count` images when the labels are known."""
    print(f"{report['model']} {report['version']} on {report['provider']}: executed order "
          f"{report['executed_order']}"
          + (f", skipped {report['skipped']}" if report["skipped"] else ""))
    for row in report["predictions"]:
        print(f"{row['file']}\t{row['class']}")
    if "accuracy" in report:
        print(f"accuracy {report['accuracy']:.4f} on {count} images")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-run EXPORT_OR_URI IMAGES... [--order] [--seed] [--policy] [--exclude]
    [--provider] [--batch-size] [--json]`: classify images with any order of the blocks."""
    args = _parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size {args.batch_size}: must be >= 1")
        exclude = parse_indices(args.exclude, "--exclude")
        policy = Policy.parse(args.policy)
        runtime = BlockRuntime(resolve_source(args.model), args.provider, exclude)
        names = runtime.manifest["class_names"]
        requested, executed, skipped = runtime.plan(args.order, args.seed, policy)
        files, labels = _collect_images(args.images, names)
        predictions = _classify(runtime, files, executed, policy, args.batch_size, args.resize)
    except (ExportError, MissingBlocksError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {"model": runtime.manifest["name"], "version": runtime.manifest["version"],
              "provider": runtime.provider, "requested_order": requested,
              "executed_order": executed, "skipped": skipped,
              "missing": {str(k): v for k, v in sorted(runtime.missing.items())},
              "predictions": [{"file": str(f), "class": names[p], "index": int(p)}
                              for f, p in zip(files, predictions)]}
    if labels is not None:
        report["accuracy"] = float(np.mean(np.asarray(predictions) == np.asarray(labels)))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_report(report, len(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
