"""The order-agnostic runtime: run an exported model's stem, then any order of any subset of its
blocks, then its head, with ONNX Runtime.

    runtime = BlockRuntime("exports/ls_best")                       # hashes checked first
    result = runtime.predict(images_uint8_nhwc, order="random", seed=3, policy="min_blocks:6")
    result.logits, result.executed_order, result.skipped

An export directory holds `manifest.json`, `stem.onnx`, one `block_XX.onnx` per block and
`head.onnx` (see `anyorder.export.blocks`). Loading checks every file against the manifest's sha256
before any session exists: a changed file is refused, never run. The stem and head must load; a
block that is absent, fails to load or is excluded by the caller is *missing*, and a `Policy`
says what a run does about it: `skip` (run what is there), `fail`, or `min_blocks:k` (fail when
fewer than k blocks would run). Every result reports the order executed and the blocks skipped.

Speed: each session runs with thread spinning off (a chain of sessions on few cores otherwise
fights over them). The chain of per-block sessions costs a Python call per block; an order that
recurs (sequential, or any order asked for twice) is composed once into a single ONNX graph from
the verified block graphs and kept in a small cache, so it runs as one call. On CUDA, tokens stay
on the device between blocks (I/O binding). `bench/runtime_bench.py` measures all of this.
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from anyorder.threads import session_threads
from anyorder.errors import InputError
from anyorder.files import sha256_file

MANIFEST = "manifest.json"
FORMAT = 1
OrderSpec = Union[str, Sequence[int]]


class ExportError(InputError):
    """An export directory, or an input given to it, that cannot be used; names the file/value."""


class MissingBlocksError(RuntimeError):
    """The block policy refuses to run with the blocks that are available."""


# -- policies ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """What to do about missing blocks: skip them, fail, or fail below a minimum count."""
    kind: str = "skip"
    min_blocks: int = 0

    KINDS = ("skip", "fail", "min_blocks")

    @classmethod
    def parse(cls, text: Union[str, "Policy"]) -> "Policy":
        """"skip", "fail" or "min_blocks:K" -> Policy; ExportError on anything else."""
        if isinstance(text, Policy):
            return text
        kind, _, count = str(text).partition(":")
        if kind not in cls.KINDS or (kind == "min_blocks") != bool(count):
            raise ExportError(f"policy {text!r}: use skip, fail or min_blocks:K")
        if kind != "min_blocks":
            return cls(kind)
        if not count.isdigit() or int(count) < 1:
            raise ExportError(f"policy {text!r}: K in min_blocks:K must be an integer >= 1")
        return cls(kind, int(count))

    def check(self, executed: list[int], skipped: list[int]) -> None:
        if self.kind == "fail" and skipped:
            raise MissingBlocksError(f"blocks {skipped} are missing and the policy is 'fail'")
        if self.kind == "min_blocks" and len(executed) < self.min_blocks:
            raise MissingBlocksError(f"only {len(executed)} block(s) can run ({executed}); the "
                                     f"policy needs at least {self.min_blocks}")

    def __str__(self) -> str:
        return f"min_blocks:{self.min_blocks}" if self.kind == "min_blocks" else self.kind


def parse_indices(text: str, what: str) -> list[int]:
    """"3,0,2" -> [3, 0, 2]; ExportError naming `what` on anything else."""
    try:
        return [int(part) for part in str(text).replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise ExportError(f"{what} {text!r}: use block indices such as 3,0,2") from None


@dataclass
class RunResult:
    logits: np.ndarray                 # (N, num_classes) float32
    executed_order: list[int]          # blocks run, in the order they ran
    skipped: list[int]                 # blocks of the requested order that did not run
    requested_order: list[int] = field(default_factory=list)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


# -- loading ----------------------------------------------------------------------------------

def read_manifest(export_dir: Union[str, Path]) -> dict:
    """The manifest of an export directory; ExportError if it is missing or not ours."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path}: no such file; is {export_dir} an export directory written by "
                          f"the export stage (exports/<model>/)?")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc}); export the model again") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, this runtime reads format "
                          f"{FORMAT}; export the model again with this version")
    return manifest


def session_options(threads: Optional[int] = None):
    """Options for one session of a chain: no spinning threads (idle sessions would keep the
    cores busy), sequential execution, full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or session_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


SEEN_ORDERS = 4096  # orders remembered to spot the second use of one (the composition cue)
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class BlockRuntime:
    """The blocks of one export, ready to run in any order (see the module docstring).

    provider: "cpu" or "cuda" (CUDA only if ONNX Runtime really loads it: otherwise a warning and
    CPU). exclude: block indices the caller wants treated as missing. threads: intra-op threads
    per session (default: min(4, cores)). compose_cache: how many composed orders to keep (0: never
    compose). io_binding: on CUDA, keep tokens on the device between the sessions of a chain
    (False: a host round trip per block, for comparison).
    """

    def __init__(self, export_dir: Union[str, Path], provider: str = "cpu",
                 exclude: Sequence[int] = (), threads: Optional[int] = None,
                 compose_cache: int = 8, io_binding: bool = True):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if provider not in PROVIDERS:
            raise ExportError(f"provider {provider!r}: use {' or '.join(PROVIDERS)}")
        self.depth = int(self.manifest["depth"])
        self.check_exclude(exclude)
        files = self._verified_files()  # every hash, before any session
        self.threads = threads
        self.missing: dict[int, str] = {i: "excluded by the caller" for i in exclude}
        self._requested_provider = provider
        self.stem = self._session(files["stem"], required=True)
        self.head = self._session(files["head"], required=True)
        self.provider = "cuda" if self.stem.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and self.provider != "cuda":
            warnings.warn("CUDA was asked for, but onnxruntime could not load its CUDA provider "
                          f"(available: {ort.get_available_providers()}); running on CPU",
                          stacklevel=2)
        self.blocks: dict[int, object] = {}
        for index in range(self.depth):
            if index in self.missing:
                continue
            path = files["blocks"].get(index)
            if path is None:
                self.missing[index] = "file absent"
                continue
            try:
                self.blocks[index] = self._session(path)
            except Exception as exc:  # a block that cannot load is missing, not fatal
                self.missing[index] = f"failed to load: {str(exc).splitlines()[0][:200]}"
        self.slotted = bool(self.manifest.get("slot_input"))
        self.mean = np.asarray(self.manifest["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(self.manifest["std"], np.float32).reshape(1, 3, 1, 1)
        self.io_binding = io_binding
        self._compose_cache = compose_cache
        self._composed: OrderedDict[tuple, object] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # orders run once (bounded)

    @property
    def available(self) -> list[int]:
        return sorted(self.blocks)

    # -- loading helpers --------------------------------------------------------------------------
    def _verified_files(self) -> dict:
        """sha256 of every file the manifest lists, compared before anything is loaded."""
        graphs = self.manifest["graphs"]
        files: dict = {"blocks": {}}
        for role in ("stem", "head"):
            entry = graphs[role]
            path = self.export_dir / entry["file"]
            if not path.is_file():
                raise ExportError(f"{path}: the {role} graph is missing; nothing runs without it "
                                  f"(export the model again)")
            self._check_hash(path, entry["sha256"])
            files[role] = path
        for entry in graphs["blocks"]:
            path = self.export_dir / entry["file"]
            if path.is_file():  # absent blocks are the policy's business
                self._check_hash(path, entry["sha256"])
                files["blocks"][int(entry["index"])] = path
        return files

    @staticmethod
    def _check_hash(path: Path, expected: str) -> None:
        actual = sha256_file(path)
        if actual != expected:
            raise ExportError(f"{path}: sha256 {actual[:16]}... does not match the manifest's "
                              f"{expected[:16]}...; the file was changed after export and is "
                              f"not loaded")

    def _session(self, path_or_bytes, required: bool = False):
        import onnxruntime as ort
        available = ort.get_available_providers()  # asking for an absent one only adds noise
        providers = [p for p in PROVIDERS[self._requested_provider] if p in available]
        try:
            return ort.InferenceSession(str(path_or_bytes) if isinstance(path_or_bytes, Path)
                                        else path_or_bytes, session_options(self.threads),
                                        providers=providers)
        except Exception as exc:
            if required:
                raise ExportError(
                    f"{path_or_bytes}: onnxruntime {ort.__version__} cannot load it (exported "
                    f"with ONNX opset {self.manifest.get('opset')}; a newer opset than this "
                    f"onnxruntime runs needs a newer onnxruntime or a lower export.opset): "
                    f"{str(exc).splitlines()[0][:300]}") from None
            raise

    def check_exclude(self, exclude: Sequence[int]) -> set[int]:
        """Block indices to treat as missing -> a set; ExportError naming any unknown one."""
        excluded = {int(i) for i in exclude}
        bad = sorted(excluded - set(range(self.depth)))
        if bad:
            raise ExportError(f"exclude {bad}: this model has blocks 0..{self.depth - 1}")
        return excluded

    # -- orders --------------------------------------------------------------------------------
    def requested_order(self, order: OrderSpec = "sequential", seed: Optional[int] = None
                        ) -> list[int]:
        """"sequential", "random" (a permutation of all blocks from `seed`) or explicit indices."""
        if isinstance(order, str):
            if order == "sequential":
                return list(range(self.depth))
            if order == "random":
                return [int(i) for i in np.random.default_rng(seed).permutation(self.depth)]
            order = parse_indices(order, "order (sequential, random, or block indices)")
        order = [int(i) for i in order]
        if not order:
            raise ExportError("order: an explicit order needs at least one block index")
        unknown = sorted(set(order) - set(range(self.depth)))
        if unknown:
            raise ExportError(f"order {order}: blocks {unknown} do not exist (this model has "
                              f"blocks 0..{self.depth - 1})")
        if len(set(order)) != len(order):
            raise ExportError(f"order {order}: repeats a block; each block runs at most once")
        return order

    def plan(self, order: OrderSpec = "sequential", seed: Optional[int] = None,
             policy: Union[str, Policy] = "skip", exclude: Sequence[int] = ()
             ) -> tuple[list[int], list[int], list[int]]:
        """(requested, executed, skipped) for an order under a policy, with the blocks of
        `exclude` treated as missing for this call; raises before compute."""
        policy = Policy.parse(policy)
        requested = self.requested_order(order, seed)
        excluded = self.check_exclude(exclude)
        executed = [i for i in requested if i in self.blocks and i not in excluded]
        skipped = [i for i in requested if i not in executed]
        policy.check(executed, skipped)
        if not executed and not skipped:
            raise ExportError("order: no block to run")
        return requested, executed, skipped

    # -- running ---------------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) at the model's size -> normalised float32 (N, 3, H, W)."""
        images = np.asarray(images)
        size = int(self.manifest["image_size"])
        if images.dtype != np.uint8:
            raise ExportError(f"images: dtype {images.dtype}, expected uint8 (N, {size}, {size}, "
                              f"3); use predict_normalised for float input")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ExportError(f"images: shape {images.shape}, expected (N, {size}, {size}, 3) "
                              f"uint8 RGB images of {size}x{size} (resize them first)")
        batch = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return (batch - self.mean) / self.std

    def predict(self, images: np.ndarray, order: OrderSpec = "sequential",
                seed: Optional[int] = None, policy: Union[str, Policy] = "skip",
                exclude: Sequence[int] = ()) -> RunResult:
        """uint8 images (N, H, W, 3) -> RunResult (see `run`)."""
        return self.run(self.preprocess(images), order, seed, policy, exclude)

    def run(self, images: np.ndarray, order: OrderSpec = "sequential", seed: Optional[int] = None,
            policy: Union[str, Policy] = "skip", exclude: Sequence[int] = ()) -> RunResult:
        """Normalised float32 images (N, 3, H, W) -> logits, through stem, the blocks of `order`
        that are available and not in `exclude` (see `plan`), head. Raises ExportError /
        MissingBlocksError before any compute."""
        images = self.check_normalised(images)
        requested, executed, skipped = self.plan(order, seed, policy, exclude)
        key = tuple(executed)
        session = self._composed_session(key)
        if session is not None:
            logits = session.run(None, {"images": images})[0]
        elif self.provider == "cuda" and self.io_binding:
            logits = self._run_bound(images, executed)
        else:
            tokens = self.stem.run(None, {"images": images})[0]
            for slot, index in enumerate(executed):
                tokens = self.blocks[index].run(None, self._block_feed(tokens, slot))[0]
            logits = self.head.run(None, {"tokens": tokens})[0]
        return RunResult(logits, executed, skipped, requested)

    def check_normalised(self, images: np.ndarray) -> np.ndarray:
        """Normalised images (N, 3, H, W) -> contiguous float32; ExportError on a wrong shape,
        an empty batch or non-finite values."""
        images = np.asarray(images)
        size = int(self.manifest["image_size"])
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ExportError(f"images: shape {images.shape}, expected (N, 3, {size}, {size})")
        if len(images) == 0:
            raise ExportError("images: an empty batch; pass at least one image")
        if images.dtype != np.float32:
            images = images.astype(np.float32)
        if not np.isfinite(images).all():
            raise ExportError("images: contain NaN or infinite values")
        return np.ascontiguousarray(images)

    def _block_feed(self, tokens, slot: int) -> dict:
        feed = {"tokens": tokens}
        if self.slotted:
            feed["slot"] = np.array([slot], dtype=np.int64)
        return feed

    def _run_bound(self, images: np.ndarray, executed: list[int]) -> np.ndarray:
        """CUDA: tokens stay on the device from the stem to the head (I/O binding)."""
        import onnxruntime as ort

        def bound(session, feed: dict):
            binding = session.io_binding()
            for name, value in feed.items():
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    binding.bind_cpu_input(name, value)
            binding.bind_output(session.get_outputs()[0].name, "cuda")
            session.run_with_iobinding(binding)
            return binding.get_outputs()[0]

        tokens = bound(self.stem, {"images": images})
        for slot, index in enumerate(executed):
            tokens = bound(self.blocks[index], self._block_feed(tokens, slot))
        return bound(self.head, {"tokens": tokens}).numpy()

    # -- composed orders --------------------------------------------------------------------------
    def _composed_session(self, key: tuple):
        """A single-graph session for an order that recurs (sequential from the first call, any
        other from its second), cached; None where the chain should run."""
        if self._compose_cache <= 0:
            return None
        if key in self._composed:
            self._composed.move_to_end(key)
            return self._composed[key]
        seen = self._seen.pop(key, 0) + 1
        self._seen[key] = seen
        if len(self._seen) > SEEN_ORDERS:  # a server fed random orders must not grow forever
            self._seen.popitem(last=False)
        if seen < 2 and key != tuple(range(self.depth)):
            return None
        session = self._session(compose_order(self.export_dir, self.manifest, list(key))
                                .SerializeToString())
        self._composed[key] = session
        if len(self._composed) > self._compose_cache:
            self._composed.popitem(last=False)
        return session



# -- composing an order into one graph (for recurring orders) ---------------------------------

def compose_order(export_dir: Union[str, Path], manifest: dict, order: list[int]):
    """stem -> blocks of `order` -> head as one ONNX model (slots baked in as constants). The
    files are the verified ones of the export directory; nothing is re-exported."""
    import onnx
    from onnx import compose, helper, numpy_helper

    export_dir = Path(export_dir)
    graphs = manifest["graphs"]
    by_index = {entry["index"]: entry["file"] for entry in graphs["blocks"]}
    combined = compose.add_prefix(onnx.load(str(export_dir / graphs["stem"]["file"])), "stem_")
    current = "stem_tokens"
    for slot, index in enumerate(order):
        block = onnx.load(str(export_dir / by_index[index]))
        if manifest.get("slot_input"):  # the slot becomes a constant of this position
            inputs = [i for i in block.graph.input if i.name != "slot"]
            del block.graph.input[:]
            block.graph.input.extend(inputs)
            block.graph.initializer.append(
                numpy_helper.from_array(np.array([slot], dtype=np.int64), "slot"))
        block = compose.add_prefix(block, f"s{slot}_")
        combined = compose.merge_models(combined, block, io_map=[(current, f"s{slot}_tokens")])
        current = f"s{slot}_tokens_out"
    head = compose.add_prefix(onnx.load(str(export_dir / graphs["head"]["file"])), "head_")
    combined = compose.merge_models(combined, head, io_map=[(current, "head_tokens")])
    # Names the runtime feeds and reads: "images" in, "logits" out.
    rename = {"stem_images": "images", "head_logits": "logits"}
    for value in [*combined.graph.input, *combined.graph.output]:
        value.name = rename.get(value.name, value.name)
    for node in combined.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    del combined.graph.value_info[:]
    helper.set_model_props(combined, {"anyorder.order": json.dumps(order)})
    return combined


# -- command line ------------------------------------------------------------------------------

def resolve_source(source: str) -> Path:
    """An export directory, or an MLflow model URI (models:/name@alias, runs:/...) whose
    artifacts hold one (downloaded by MLflow, which must then be installed)."""
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        return Path(source)
    try:
        import mlflow
    except ImportError:
        raise ExportError(f"{source}: reading an MLflow model URI needs mlflow installed "
                          f"(pip install mlflow), or pass an export directory") from None
    try:
        local = Path(mlflow.artifacts.download_artifacts(source))
    except Exception as exc:
        raise ExportError(f"{source}: MLflow cannot resolve it ({str(exc).splitlines()[0]})"
                          f"{registry_contents(source)}") from None
    found = find_export(local)
    if found is None:
        raise ExportError(f"{source}: no {MANIFEST} in the model's artifacts ({local})")
    return found


def find_export(path: Union[str, Path]) -> Optional[Path]:
    """`path` if it is an export directory, else the first one below it (MLflow nests the
    logged export inside a model's artifacts); None if there is none."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(MANIFEST))
    return found[0] if found else None


def registry_contents(uri: str) -> str:
    """What the registry holds, for an error about `uri` (models:/name@alias or models:/name/v):
    the registered models, or the named model's versions and aliases."""
    import mlflow

    if not uri.startswith("models:/"):
        return ""
    name = uri[len("models:/"):].split("@")[0].split("/")[0]
    client = mlflow.MlflowClient()
    try:
        models = {m.name: m for m in client.search_registered_models()}
    except Exception as exc:  # the registry itself is unreachable: say so, list nothing
        return f"; the registry cannot be listed ({str(exc).splitlines()[0][:200]})"
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        return f"; registered models: {known}"
    aliases = ", ".join(f"@{a}->v{v}" for a, v in sorted(models[name].aliases.items())) or "none"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return f"; model {name!r} has versions {versions} and aliases {aliases}"


def _collect_images(paths: Sequence[str], class_names: list[str]
                    ) -> tuple[list[Path], Optional[list[int]]]:
    """Image files from files, folders of images, or one ImageFolder tree (sub-folders named
    after the model's classes: then their labels too, for an accuracy)."""
    from anyorder.data.prepare import IMAGE_EXTENSIONS

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-run EXPORT_OR_URI IMAGES... [--order] [--seed] [--policy] [--exclude]
    [--provider] [--batch-size] [--json]`: classify images with any order of the blocks."""
    import argparse
    import sys

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
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size {args.batch_size}: must be >= 1")
        exclude = parse_indices(args.exclude, "--exclude")
        policy = Policy.parse(args.policy)
        runtime = BlockRuntime(resolve_source(args.model), args.provider, exclude)
        names = runtime.manifest["class_names"]
        requested, executed, skipped = runtime.plan(args.order, args.seed, policy)
        files, labels = _collect_images(args.images, names)
        from anyorder.data.prepare import DataError, read_image

        size = int(runtime.manifest["image_size"])
        predictions = []
        bar = None
        if sys.stderr.isatty() and len(files) > args.batch_size:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(files), unit="img", desc="classifying")
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            try:
                batch = np.stack([read_image(f, size, args.resize) for f in chunk])
            except DataError as exc:
                raise ExportError(str(exc)) from None
            predictions += runtime.predict(batch, executed, policy=policy).predictions.tolist()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
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
    print(f"{report['model']} {report['version']} on {runtime.provider}: executed order "
          f"{executed}" + (f", skipped {skipped}" if skipped else ""))
    for row in report["predictions"]:
        print(f"{row['file']}\t{row['class']}")
    if labels is not None:
        print(f"accuracy {report['accuracy']:.4f} on {len(files)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
