"""A block worker: one process hosting some blocks of an export as ONNX Runtime sessions, speaking
the Open Inference Protocol (KServe v2) over HTTP, so a Triton or KServe server holding the same
`block_XX.onnx` files can stand in for it, and any v2 client (`tritonclient`) can call it.

    anyorder-worker exports/ls_best --blocks 0,1,2 --port 9001 --router http://127.0.0.1:8000

Routes (the protocol's, with models named after the block files: `block_03`):
    GET  /v2/health/live, /v2/health/ready     liveness, readiness (200 or 503)
    GET  /v2                                   server metadata and extensions
    GET  /v2/models/<block>[/versions/1]       model metadata: inputs, outputs, shapes
    GET  /v2/models/<block>/ready              the block is loaded
    POST /v2/models/<block>[/versions/1]/infer tokens (N, T, D) FP32 [+ slot INT64 (1,)]
                                               -> tokens_out, JSON or binary as asked
    POST /v2/repository/index                  the blocks hosted (Triton's repository extension)

With `--router`, the worker announces itself (its URL, blocks, model version) to our router every
`--heartbeat` seconds; an announcement expires after three periods, so a worker that dies or
hangs drops out of the router's registry on its own.

Chaos settings make the same program a faulty worker for demos and tests: `--fail-rate` (answer
500), `--delay-ms` (added latency), `--crash-after N` (exit hard on the N-th infer request),
`--garbage-rate` with `--garbage nan|shape` (answer NaN tokens, or tokens of the wrong shape).

Here: the hosted blocks (`BlockHost`), the app's assembly (`create_app`), the heartbeat and the
command line; the routes are in `worker_routes`.
"""
from __future__ import annotations

import json
import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from anyorder.export.runtime import BlockRuntime, ExportError, parse_indices, read_manifest
from anyorder.export.sources import resolve_source
from anyorder.serving import protocol
from anyorder.serving.asgi import DEFAULT_HOST, BodyLimit

MAX_BATCH = 1024
# Up to this batch a block runs on the event loop itself (a tenth of a millisecond for the default
# model, less than handing it to a thread); larger batches go to a thread so health checks and
# other requests are not held up.
INLINE_BATCH = 8
PLATFORM = "onnxruntime_onnx"   # what Triton reports for the same files


def block_name(index: int) -> str:
    """The v2 model name of block `index` (the name of its file without .onnx)."""
    return f"block_{index:02d}"


def block_index(name: str) -> Optional[int]:
    """`block_03` -> 3; None for any other name."""
    prefix, _, digits = name.partition("_")
    return int(digits) if prefix == "block" and digits.isdigit() else None


@dataclass
class Chaos:
    """Faults the worker injects on purpose (all off by default)."""
    fail_rate: float = 0.0     # fraction of infer requests answered 500
    delay_ms: float = 0.0      # added to every infer request
    crash_after: int = 0       # exit (os._exit) on this infer request; 0: never
    garbage_rate: float = 0.0  # fraction of infer requests answered with garbage
    garbage: str = "nan"       # nan: NaN tokens; shape: tokens missing their last feature
    seed: int = 0

    def __post_init__(self):
        for name in ("fail_rate", "garbage_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ExportError(f"--{name.replace('_', '-')} {value}: a fraction in [0, 1]")
        if self.delay_ms < 0 or self.crash_after < 0:
            raise ExportError("--delay-ms and --crash-after must be >= 0")
        if self.garbage not in ("nan", "shape"):
            raise ExportError(f"--garbage {self.garbage!r}: use nan or shape")

    @property
    def active(self) -> bool:
        return bool(self.fail_rate or self.delay_ms or self.crash_after or self.garbage_rate)


class BlockHost:
    """The hosted blocks of one export and the protocol's view of them (no HTTP here).

    blocks: the block indices to host (None: all). Every hosted file is checked against the
    manifest's sha256 before it is loaded (the runtime does it); a block that cannot be hosted
    stops the worker before it serves."""

    def __init__(self, export_dir: Union[str, Path], blocks: Optional[Sequence[int]] = None,
                 provider: str = "cpu", threads: int = 1, chaos: Optional[Chaos] = None):
        manifest = read_manifest(export_dir)
        depth = int(manifest["depth"])
        hosted = sorted(set(range(depth) if blocks is None else (int(i) for i in blocks)))
        unknown = [i for i in hosted if not 0 <= i < depth]
        if unknown or not hosted:
            raise ExportError(f"--blocks {list(blocks or [])}: this model has blocks "
                              f"0..{depth - 1}; name at least one of them")
        runtime = BlockRuntime(export_dir, provider, [i for i in range(depth) if i not in hosted],
                               threads=threads, compose_cache=0)
        broken = {i: runtime.missing[i] for i in hosted if i in runtime.missing}
        if broken:
            raise ExportError(f"{export_dir}: cannot host blocks {broken}")
        self.manifest = manifest
        self.provider = runtime.provider
        self.depth = depth
        self.blocks = hosted
        self.sessions = {block_name(i): runtime.blocks[i] for i in hosted}
        self.tokens_shape = (int(manifest["num_tokens"]), int(manifest["embed_dim"]))
        self.slotted = bool(manifest.get("slot_input"))
        self.chaos = chaos or Chaos()
        self._rng = np.random.default_rng(self.chaos.seed)
        self._lock = threading.Lock()
        self.infer_count = 0

    # -- protocol views ------------------------------------------------------------------------
    def server_metadata(self) -> dict:
        return {"name": "anyorder-worker", "version": "1",
                "extensions": ["binary_tensor_data", "model_repository"],
                "model": self.manifest["name"], "model_version": self.manifest["version"],
                "blocks": self.blocks}

    def model_metadata(self, name: str) -> dict:
        tokens = [-1, *self.tokens_shape]
        inputs = [{"name": "tokens", "datatype": "FP32", "shape": tokens}]
        if self.slotted:
            inputs.append({"name": "slot", "datatype": "INT64", "shape": [1]})
        return {"name": name, "versions": ["1"], "platform": PLATFORM, "inputs": inputs,
                "outputs": [{"name": "tokens_out", "datatype": "FP32", "shape": tokens}]}

    def not_hosted(self, name: str, version: str) -> Optional[str]:
        """Why `name` (version `version`) cannot be served here; None if it can."""
        if name in self.sessions and version == "1":
            return None
        return (f"model {name!r} (version {version}) is not hosted here; this worker hosts "
                f"{', '.join(self.sessions)} (version 1)")

    def repository_index(self) -> list[dict]:
        return [{"name": name, "version": "1", "state": "READY"} for name in self.sessions]

    # -- inference ----------------------------------------------------------------------------
    def check_inputs(self, name: str, tensors: dict) -> dict:
        """The feed for block `name` from decoded inputs; ProtocolError naming what is wrong."""
        expected = {"tokens", "slot"} if self.slotted else {"tokens"}
        if set(tensors) != expected:
            raise protocol.ProtocolError(f"{name} takes inputs {sorted(expected)}, got "
                                         f"{sorted(tensors)}")
        tokens = tensors["tokens"]
        if tokens.dtype != np.float32 or tokens.ndim != 3 or tokens.shape[1:] != self.tokens_shape:
            raise protocol.ProtocolError(
                f"{name}: tokens must be FP32 (N, {self.tokens_shape[0]}, {self.tokens_shape[1]}),"
                f" got {protocol.datatype_of(tokens)} {list(tokens.shape)}")
        if not 1 <= len(tokens) <= MAX_BATCH:
            raise protocol.ProtocolError(f"{name}: batch of {len(tokens)}; send 1..{MAX_BATCH}")
        feed = {"tokens": tokens}
        if self.slotted:
            slot = tensors["slot"]
            if slot.dtype != np.int64 or slot.shape != (1,) or not 0 <= int(slot[0]) < self.depth:
                raise protocol.ProtocolError(f"{name}: slot must be INT64 (1,) in "
                                             f"0..{self.depth - 1}")
            feed["slot"] = slot
        return feed

    def chaos_draw(self) -> tuple[bool, bool]:
        """(fail, garbage) for one infer request; exits the process on the crash_after-th."""
        if not self.chaos.active:
            return False, False
        with self._lock:
            self.infer_count += 1
            if self.chaos.crash_after and self.infer_count >= self.chaos.crash_after:
                os._exit(17)  # a crash: no cleanup, no answer, the socket just closes
            draws = self._rng.random(2)
        return bool(draws[0] < self.chaos.fail_rate), bool(draws[1] < self.chaos.garbage_rate)

    def infer(self, name: str, feed: dict, garbage: bool = False) -> np.ndarray:
        tokens = self.sessions[name].run(None, feed)[0]
        if garbage:
            tokens = tokens[..., :-1].copy() if self.chaos.garbage == "shape" else \
                np.full_like(tokens, np.nan)
        return tokens


# -- the ASGI app -------------------------------------------------------------------------------

def create_app(host: BlockHost, max_body_bytes: int = 64 << 20, announce: Optional[dict] = None):
    """The worker's Starlette app (the protocol routes of the module docstring). `announce`:
    {"router": url, "every_s": seconds} to heartbeat to a router once serving (the URL it
    announces is set by `serve`)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette

    from anyorder.serving.worker_routes import infer_first, protocol_routes

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        if announce and announce.get("url"):
            thread = threading.Thread(target=heartbeat, daemon=True,
                                      args=(host, announce, stop))
            thread.start()
        yield
        stop.set()

    routes_app = Starlette(routes=protocol_routes(host), lifespan=lifespan)
    return BodyLimit(infer_first(host, routes_app), max_body_bytes)


def heartbeat(host: BlockHost, announce: dict, stop: threading.Event) -> None:
    """Announce this worker to the router every `every_s` seconds until `stop` (a router that
    is down is tried again next period; the worker serves either way)."""
    payload = json.dumps({"url": announce["url"], "blocks": host.blocks,
                          "model": host.manifest["name"], "version": host.manifest["version"],
                          "ttl_s": 3 * announce["every_s"]}).encode()
    target = announce["router"].rstrip("/") + "/router/announce"
    while not stop.is_set():
        request = urllib.request.Request(target, payload, {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=max(0.5, announce["every_s"])).close()
        except OSError:
            pass  # the router is not up (yet): the next period tries again
        stop.wait(announce["every_s"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-worker EXPORT [--blocks 0,1] [--host] [--port] [--router URL] [chaos...]`"""
    import argparse
    import sys

    from anyorder.serving.asgi import bind, run, url_of

    parser = argparse.ArgumentParser(prog="anyorder-worker",
                                     description="Host blocks of an export over KServe v2.")
    parser.add_argument("export", help="export directory (exports/<model>) or models:/ URI")
    parser.add_argument("--blocks", default="", help="block indices to host, e.g. 0,3 (default: "
                                                     "all)")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--router", default="", help="router URL to announce to (heartbeats)")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between announces")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per block")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--crash-after", type=int, default=0)
    parser.add_argument("--garbage-rate", type=float, default=0.0)
    parser.add_argument("--garbage", default="nan", help="nan or shape")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chaos draws")
    args = parser.parse_args(argv)
    try:
        chaos = Chaos(args.fail_rate, args.delay_ms, args.crash_after, args.garbage_rate,
                      args.garbage, args.seed)
        blocks = parse_indices(args.blocks, "--blocks") or None
        if args.heartbeat <= 0:
            raise ExportError(f"--heartbeat {args.heartbeat}: must be > 0 seconds")
        host = BlockHost(resolve_source(args.export), blocks, args.provider, args.threads, chaos)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind(args.host, args.port)
    announce = {"router": args.router, "every_s": args.heartbeat, "url": url_of(sock)} \
        if args.router else None
    run(create_app(host, announce=announce), sock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
