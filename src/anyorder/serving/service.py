"""The HTTP service: one model, from a registry URI (`models:/<name>@champion`) or an export
directory, run in-process (the order-agnostic runtime) or through a cluster of block workers
(the router), behind FastAPI + uvicorn, bound to 127.0.0.1 unless told otherwise.

    anyorder-serve exports/ls_best                      # in-process, http://127.0.0.1:8000
    anyorder-serve models:/anyorder-vit@champion --cluster --worker http://10.0.0.5:8001 ...

Routes:
    POST /v1/models/<name>/predict   PNG/JPEG uploads (multipart field `images`, one or more);
                                     query: order, seed, policy, exclude, deadline_ms, resize
    POST /v2/models/<name>/infer     the same as a KServe v2 tensor request: input `images`
                                     UINT8 (N, H, W, 3), or FP32 (N, 3, H, W) normalised as
                                     the manifest says; options as request parameters
    GET  /v1/models, /v1/models/<name>        the manifest, the blocks available (and workers)
    GET  /health/live, /health/ready          200, or 503 while no block can run
    GET  /metrics                              Prometheus text: requests, latency, blocks
    POST /router/announce, GET /router/workers (cluster backend) worker heartbeats, registry

Every answer to a prediction carries the executed order, the skipped blocks (and why) and the
host of each block. Bad input is a 4xx with a message saying what is wrong (400 malformed, 404
unknown model, 413 too large, 415 not PNG/JPEG, 422 wrong size/channels); a policy that cannot
be met is 503, a deadline that runs out 504; the service keeps serving after any of them.
"""

import io
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from anyorder.errors import InputError
from anyorder.export.runtime import BlockRuntime, ExportError, MissingBlocksError, Policy, parse_indices
from anyorder.serving import protocol
from anyorder.serving.asgi import DEFAULT_HOST, BodyLimit, PayloadTooLarge
from anyorder.serving.router import DYNAMIC_ORDERS, DeadlineExceeded, Router

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096
INLINE_BATCH = 4  # in-process backend: batches up to this run on the event loop (when idle)  # per uploaded image, checked from its header before decoding


class ImageError(InputError):
    """An upload that is not a usable image for this model (HTTP 415 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    max_images: int = 64
    default_deadline_s: float = 10.0
    max_deadline_s: float = 60.0


@dataclass
class Prediction:
    logits: np.ndarray
    executed_order: list
    skipped: list
    requested_order: list
    hosts: list
    reasons: dict


# -- backends: where the blocks run -----------------------------------------------------------

class LocalBackend:
    """The blocks in this process (BlockRuntime); one inference at a time, so concurrent
    requests queue instead of fighting over the cores."""
    kind = "local"

    def __init__(self, export_dir: Union[str, Path], threads: Optional[int] = None,
                 compose_cache: int = 8):
        import anyio

        self.runtime = BlockRuntime(export_dir, threads=threads, compose_cache=compose_cache)
        self.manifest = self.runtime.manifest
        self.preprocess = self.runtime.preprocess  # uint8 NHWC -> normalised NCHW
        self._limiter = anyio.CapacityLimiter(1)

    async def start(self):
        return None

    async def close(self):
        return None

    @property
    def ready(self) -> bool:
        return bool(self.runtime.available)

    def describe(self) -> dict:
        return {"backend": self.kind, "available_blocks": self.runtime.available,
                "missing_blocks": {str(k): v for k, v in sorted(self.runtime.missing.items())}}

    async def run(self, images, order, seed, policy, exclude, deadline_s) -> Prediction:
        import anyio

        if isinstance(order, str) and order in DYNAMIC_ORDERS:
            order = "sequential"  # in one process every block is equally reachable
        # runtime.run checks the images and plans (policy included) before any compute.
        try:
            with anyio.fail_after(deadline_s):
                if len(images) <= INLINE_BATCH and self._limiter.borrowed_tokens == 0:
                    # A small batch with nobody queued: a millisecond on the event loop is
                    # cheaper than a hand-off to a thread and back.
                    result = self.runtime.run(images, order, seed, policy, exclude)
                else:
                    result = await anyio.to_thread.run_sync(
                        self.runtime.run, images, order, seed, policy, exclude,
                        limiter=self._limiter, abandon_on_cancel=True)
        except TimeoutError:
            raise DeadlineExceeded(f"the deadline of {deadline_s:.3f} s ran out") from None
        reasons = {int(b): ("excluded by the caller" if b in exclude else
                            self.runtime.missing.get(b, "missing")) for b in result.skipped}
        return Prediction(result.logits, result.executed_order, result.skipped,
                          result.requested_order, ["local"] * len(result.executed_order),
                          reasons)


class ClusterBackend:
    """The blocks in worker processes, through the router."""
    kind = "cluster"

    def __init__(self, router: Router):
        self.router = router
        self.manifest = router.manifest
        self.preprocess = router.local.preprocess  # uint8 NHWC -> normalised NCHW

    async def start(self):
        await self.router.start()

    async def close(self):
        await self.router.close()

    @property
    def ready(self) -> bool:
        return self.router.ready

    def describe(self) -> dict:
        return {"backend": self.kind,
                "available_blocks": sorted(self.router.registry.live_blocks()),
                "workers": self.router.registry.view()}

    async def run(self, images, order, seed, policy, exclude, deadline_s) -> Prediction:
        result = await self.router.run(images, order, seed, policy, exclude, deadline_s)
        return Prediction(result.logits, result.executed_order, result.skipped,
                          result.requested_order, result.hosts, result.reasons)


# -- request parsing ---------------------------------------------------------------------------

@dataclass
class Options:
    order: Union[str, list] = "sequential"
    seed: Optional[int] = None
    policy: Policy = Policy()
    exclude: tuple = ()
    deadline_s: float = 10.0
    resize: bool = False

    @classmethod
    def parse(cls, values: dict, limits: Limits) -> "Options":
        """Query or request parameters -> Options; ExportError naming a bad one."""
        known = {"order", "seed", "policy", "exclude", "deadline_ms", "resize"}
        unknown = sorted(set(values) - known - {"binary_data_output"})
        if unknown:
            raise ExportError(f"unknown option(s) {unknown}; the options are {sorted(known)}")
        order = str(values.get("order", "sequential"))
        if order not in ("sequential", "random", *DYNAMIC_ORDERS):
            order = parse_indices(order, "order (sequential, random, any, fastest or block "
                                         "indices)")
        seed = values.get("seed")
        try:
            seed = None if seed in (None, "") else int(seed)
            deadline_ms = float(values.get("deadline_ms", limits.default_deadline_s * 1e3))
        except (TypeError, ValueError):
            raise ExportError(f"seed {values.get('seed')!r} / deadline_ms "
                              f"{values.get('deadline_ms')!r}: must be numbers") from None
        if not 0 < deadline_ms <= limits.max_deadline_s * 1e3:
            raise ExportError(f"deadline_ms {deadline_ms:g}: must be in (0, "
                              f"{limits.max_deadline_s * 1e3:g}]")
        resize = str(values.get("resize", "false")).lower()
        if resize not in ("true", "false", "1", "0"):
            raise ExportError(f"resize {values.get('resize')!r}: true or false")
        return cls(order, seed, Policy.parse(values.get("policy", "skip")),
                   tuple(parse_indices(values.get("exclude", ""), "exclude")),
                   deadline_ms / 1e3, resize in ("true", "1"))


def decode_image(data: bytes, name: str, size: int, resize: bool) -> np.ndarray:
    """One PNG/JPEG upload -> uint8 (size, size, 3); ImageError saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{name}: not an image PNG or JPEG could decode", 415) from None
    if image.format not in IMAGE_FORMATS:
        raise ImageError(f"{name}: a {image.format} image; send PNG or JPEG", 415)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} pixels is more than {MAX_PIXELS}; send "
                         f"{size}x{size} images", 413)
    bands = image.getbands()
    if image.mode != "RGB":
        raise ImageError(f"{name}: mode {image.mode} ({len(bands)} channel(s)); the model takes "
                         f"RGB images (3 channels): convert it to RGB first")
    if (width, height) != (size, size) and not resize:
        raise ImageError(f"{name}: {width}x{height} pixels, the model takes {size}x{size}; "
                         f"resize it, or pass resize=true to let the service do it")
    try:
        if (width, height) != (size, size):
            image.draft("RGB", (size, size))
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)  # RGB, checked above
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: the image data is damaged ({exc})") from None


def tensor_images(manifest: dict, tensors: dict, max_images: int, preprocess) -> np.ndarray:
    """The `images` input of a v2 request -> normalised float32 (N, 3, H, W); `preprocess`
    normalises uint8 images (the backend's runtime's)."""
    size = int(manifest["image_size"])
    if set(tensors) != {"images"}:
        raise protocol.ProtocolError(f"inputs {sorted(tensors)}: send one input named images, "
                                     f"UINT8 (N, {size}, {size}, 3) or FP32 (N, 3, {size}, "
                                     f"{size}) normalised")
    images = tensors["images"]
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (size, size, 3):
        batch = preprocess(images)
    elif images.dtype == np.float32 and images.ndim == 4 and images.shape[1:] == (3, size, size):
        batch = images
    else:
        raise protocol.ProtocolError(
            f"images: {protocol.datatype_of(images)} {list(images.shape)}; send UINT8 (N, {size},"
            f" {size}, 3) RGB or FP32 (N, 3, {size}, {size}) normalised")
    if not 1 <= len(batch) <= max_images:
        raise protocol.ProtocolError(f"images: {len(batch)} images; send 1..{max_images} per "
                                     f"request")
    return batch


# -- metrics -------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics of one service (its own registry, so several apps never collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("anyorder_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("anyorder_request_seconds", "Request latency by route",
                                 ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                          5, 10, 30))
        self.images = Counter("anyorder_images", "Images classified", registry=self.registry)
        self.executed = Counter("anyorder_blocks_executed", "Blocks run, over all requests",
                                registry=self.registry)
        self.skipped = Counter("anyorder_blocks_skipped",
                               "Blocks skipped, by why (excluded, unavailable, deadline)",
                               ["why"], registry=self.registry)
        self.hops = Counter("anyorder_hops", "Hops to workers by outcome", ["outcome"],
                            registry=self.registry)
        self.hop_latency = Histogram("anyorder_hop_seconds", "Round trip of one hop to a worker",
                                     registry=self.registry,
                                     buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25,
                                              .5, 1, 2.5))

    def hop(self, url: str, block: int, outcome: str, seconds: float) -> None:
        self.hops.labels(outcome).inc()
        if outcome == "ok":
            self.hop_latency.observe(seconds)

    def prediction(self, result: Prediction, count: int) -> None:
        self.images.inc(count)
        self.executed.inc(len(result.executed_order))
        for block in result.skipped:
            reason = result.reasons.get(int(block), "")
            why = "excluded" if "excluded" in reason else \
                "deadline" if "deadline" in reason else "unavailable"
            self.skipped.labels(why).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class Measure:
    """ASGI middleware: every request's count (by route template and status) and latency. Plain
    ASGI, as Starlette's decorator middleware costs about a millisecond per request here."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router
            if route != "/metrics":
                self.metrics.requests.labels(route, str(status[0])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)


# -- the app -------------------------------------------------------------------------------------

def create_app(backend, limits: Optional[Limits] = None, aliases: Sequence[str] = ()):
    """The FastAPI app of the module docstring over a LocalBackend or ClusterBackend. The model
    answers to its manifest name and to `aliases` (e.g. its registered name)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    limits = limits or Limits()
    metrics = Metrics()
    if isinstance(backend, ClusterBackend):
        backend.router.on_hop = metrics.hop
    manifest = backend.manifest
    name = manifest["name"]

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        yield
        await backend.close()

    app = FastAPI(title="anyorder", version=str(manifest["version"]), lifespan=lifespan,
                  description=__doc__.split("\n\n")[0])

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status)

    app.add_exception_handler(PayloadTooLarge, lambda request, exc: error(413, str(exc)))
    # Inner to outer: the size limit, then the measurement (so a refused body is counted too).
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(Measure, metrics=metrics)

    names = [name, *(a for a in aliases if a != name)]

    def check_model(model: str) -> Optional[JSONResponse]:
        if model not in names:
            return error(404, f"model {model!r} is not served here; this service serves "
                              f"{' or '.join(map(repr, names))} (GET /v1/models)")
        return None

    async def predict(images: np.ndarray, options: Options) -> Prediction:
        result = await backend.run(images, options.order, options.seed, options.policy,
                                   options.exclude, options.deadline_s)
        metrics.prediction(result, len(images))
        return result

    def failure(exc: Exception) -> JSONResponse:
        """The HTTP answer to a known failure of a prediction."""
        if isinstance(exc, PayloadTooLarge):
            return error(413, str(exc))
        if isinstance(exc, ImageError):
            return error(exc.status, str(exc))
        if isinstance(exc, MissingBlocksError):
            return error(503, str(exc))
        if isinstance(exc, DeadlineExceeded):
            return error(504, str(exc))
        return error(400, str(exc))

    known_failures = (InputError, MissingBlocksError, DeadlineExceeded, PayloadTooLarge)

    def report(result: Prediction) -> dict:
        return {"executed_order": [int(i) for i in result.executed_order],
                "skipped": [int(i) for i in result.skipped],
                "skipped_why": {str(k): v for k, v in result.reasons.items()},
                "requested_order": [int(i) for i in result.requested_order],
                "hosts": result.hosts}

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if backend.ready:
            return {"status": "ready"}
        return error(503, "no block can run yet (no live worker hosts any block)")

    @app.get("/v1/models")
    async def models():
        return {"models": names}

    @app.get("/v1/models/{model}")
    async def metadata(model: str):
        missing = check_model(model)
        if missing:
            return missing
        keep = ("name", "version", "variant", "arch", "depth", "embed_dim", "num_tokens",
                "num_classes", "class_names", "image_size", "channels", "mean", "std", "input",
                "slot_input", "opset", "accuracy")
        return {"manifest": {k: manifest[k] for k in keep if k in manifest},
                **backend.describe(),
                "limits": {"max_body_bytes": limits.max_body_bytes,
                           "max_images": limits.max_images,
                           "default_deadline_ms": limits.default_deadline_s * 1e3}}

    @app.post("/v1/models/{model}/predict")
    async def predict_images(model: str, request: Request):
        missing = check_model(model)
        if missing:
            return missing
        try:
            options = Options.parse(dict(request.query_params), limits)
            if not request.headers.get("content-type", "").startswith("multipart/form-data"):
                raise ImageError("send the images as multipart/form-data, field \"images\" "
                                 "(curl -F images=@digit.png ...)", 415)
            size = int(manifest["image_size"])
            form = await request.form(max_files=limits.max_images, max_fields=16,
                                      max_part_size=limits.max_body_bytes)
            uploads = [value for key, value in form.multi_items() if key == "images"]
            if not uploads or any(isinstance(u, str) for u in uploads):
                raise ImageError("no file in field \"images\"; upload one or more PNG/JPEG "
                                 "files as images=@file")
            images = np.stack([decode_image(await u.read(), u.filename or f"image {i}", size,
                                            options.resize) for i, u in enumerate(uploads)])
            result = await predict(backend.preprocess(images), options)
        except known_failures as exc:
            return failure(exc)
        except Exception as exc:  # starlette's own multipart errors, e.g. too many files
            if type(exc).__name__ in ("MultiPartException", "HTTPException"):
                return error(400, f"malformed upload: {getattr(exc, 'detail', exc)}")
            raise
        names = manifest["class_names"]
        return {"model": name, "version": manifest["version"], **report(result),
                "predictions": [{"file": u.filename, "class": names[int(p)], "index": int(p)}
                                for u, p in zip(uploads, result.logits.argmax(axis=1))],
                "logits": result.logits.tolist()}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        missing = check_model(model)
        if missing:
            return missing
        try:
            body = await request.body()
            message, tensors = protocol.decode_request(
                body, request.headers.get(protocol.HEADER_LENGTH))
            outputs = protocol.requested_outputs(message, ["logits", "class_index"])
            parameters = message.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise protocol.ProtocolError("\"parameters\" must be an object")
            options = Options.parse(parameters, limits)
            result = await predict(tensor_images(manifest, tensors, limits.max_images,
                                                 backend.preprocess), options)
        except known_failures as exc:
            return failure(exc)
        values = {"logits": result.logits.astype(np.float32),
                  "class_index": result.logits.argmax(axis=1).astype(np.int64)}
        as_text = {key: json.dumps(value) for key, value in report(result).items()}
        body, headers = protocol.encode_response(name, {k: values[k] for k in outputs}, message,
                                                 parameters=as_text,
                                                 version=str(manifest["version"]))
        return Response(body, 200, headers=headers)

    # The protocol's health and metadata routes, so v2 clients can use the service as well.
    @app.get("/v2/health/ready")
    async def v2_ready():
        return Response(status_code=200 if backend.ready else 503)

    @app.get("/v2/models/{model}")
    async def v2_metadata(model: str):
        missing = check_model(model)
        if missing:
            return missing
        size = int(manifest["image_size"])
        return {"name": name, "versions": [str(manifest["version"])], "platform": "anyorder",
                "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
                "outputs": [{"name": "logits", "datatype": "FP32",
                             "shape": [-1, int(manifest["num_classes"])]},
                            {"name": "class_index", "datatype": "INT64", "shape": [-1]}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    if isinstance(backend, ClusterBackend):
        router = backend.router

        @app.post("/router/announce")
        async def announce(request: Request):
            try:
                payload = json.loads(await request.body())
                router.announce(str(payload["url"]), payload["blocks"],
                                float(payload.get("ttl_s", 3.0)), str(payload.get("version")))
            except (ValueError, KeyError, TypeError) as exc:
                return error(400, f"an announcement is JSON {{url, blocks, ttl_s, version}}: "
                                  f"{exc}")
            except ExportError as exc:
                return error(409, str(exc))
            return {"status": "ok"}

        @app.get("/router/workers")
        async def workers():
            return {"workers": router.registry.view(),
                    "live_blocks": sorted(router.registry.live_blocks())}

    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-serve MODEL [--host] [--port] [--cluster] [--worker URL ...] ...`"""
    import argparse
    import sys

    from anyorder.export.runtime import resolve_source
    from anyorder.serving.asgi import bind, run

    parser = argparse.ArgumentParser(prog="anyorder-serve",
                                     description="Serve a model over HTTP (see anyorder.serving"
                                                 ".service).")
    parser.add_argument("model", help="export directory (exports/<model>) or MLflow model URI "
                                      "(models:/<name>@champion)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="default 127.0.0.1 (loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--cluster", action="store_true",
                        help="run the blocks on workers (announced, or --worker)")
    parser.add_argument("--worker", action="append", default=[],
                        help="URL of a KServe v2 server hosting block_XX models (repeatable; "
                             "implies --cluster)")
    parser.add_argument("--hop-timeout-ms", type=float, default=1000)
    parser.add_argument("--attempts", type=int, default=3, help="hosts tried per block")
    parser.add_argument("--select", default="random", choices=["random", "fastest"])
    parser.add_argument("--ban-base-ms", type=float, default=500)
    parser.add_argument("--ban-max-s", type=float, default=30)
    parser.add_argument("--probe-interval-ms", type=float, default=500)
    parser.add_argument("--max-body-mb", type=float, default=8)
    parser.add_argument("--max-images", type=int, default=64)
    parser.add_argument("--deadline-ms", type=float, default=10000, help="default deadline")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--compose-cache", type=int, default=8,
                        help="in-process backend: orders composed into one graph when they recur "
                             "(~60 ms once, then one call; 0: never, e.g. for random orders)")
    args = parser.parse_args(argv)
    try:
        if args.max_images < 1 or args.max_body_mb <= 0 or args.deadline_ms <= 0:
            raise ExportError("--max-images, --max-body-mb and --deadline-ms must be positive")
        limits = Limits(int(args.max_body_mb * (1 << 20)), args.max_images,
                        args.deadline_ms / 1e3, max(60.0, args.deadline_ms / 1e3))
        export_dir = resolve_source(args.model)
        if args.cluster or args.worker:
            backend = ClusterBackend(Router(
                export_dir, [w.rstrip("/") for w in args.worker], args.hop_timeout_ms / 1e3,
                args.ban_base_ms / 1e3, args.ban_max_s, args.attempts, args.select,
                args.probe_interval_ms / 1e3, threads=args.threads))
        else:
            backend = LocalBackend(export_dir, args.threads, args.compose_cache)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Served from the registry, the model also answers to its registered name.
    aliases = [args.model[len("models:/"):].split("@")[0].split("/")[0]] \
        if args.model.startswith("models:/") else []
    run(create_app(backend, limits, aliases), bind(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
