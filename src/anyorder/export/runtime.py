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

The `anyorder-run` command line is in `anyorder.export.cli`; `anyorder.export.sources` turns an
MLflow model URI into an export directory.
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
from anyorder.export.compose import compose_order
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
