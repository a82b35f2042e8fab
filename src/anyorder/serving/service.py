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

Here: the app's assembly (`create_app`) and the command line (`main`); the routes are in
`service_routes`, the backends in `backends`, request checking in `inputs`, metrics in `metrics`.
"""

from contextlib import asynccontextmanager
from typing import Optional, Sequence

from anyorder.export.runtime import ExportError
from anyorder.serving.asgi import DEFAULT_HOST, BodyLimit, PayloadTooLarge
from anyorder.serving.backends import ClusterBackend, LocalBackend
from anyorder.serving.inputs import Limits
from anyorder.serving.metrics import Measure, Metrics
from anyorder.serving.router import Router


def create_app(backend, limits: Optional[Limits] = None, aliases: Sequence[str] = ()):
    """The FastAPI app of the module docstring over a LocalBackend or ClusterBackend. The model
    answers to its manifest name and to `aliases` (e.g. its registered name)."""
    from fastapi import FastAPI

    from anyorder.serving.service_routes import (ServedModel, cluster_routes, error,
                                                 health_routes, image_routes, metrics_routes,
                                                 model_routes, v2_routes)

    limits = limits or Limits()
    metrics = Metrics()
    if isinstance(backend, ClusterBackend):
        backend.router.on_hop = metrics.hop
    manifest = backend.manifest

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        yield
        await backend.close()

    app = FastAPI(title="anyorder", version=str(manifest["version"]), lifespan=lifespan,
                  description=__doc__.split("\n\n")[0])
    app.add_exception_handler(PayloadTooLarge, lambda request, exc: error(413, str(exc)))
    # Inner to outer: the size limit, then the measurement (so a refused body is counted too).
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(Measure, metrics=metrics)

    served = ServedModel(backend, limits, metrics, aliases)
    for routes in (health_routes(served), model_routes(served), image_routes(served),
                   v2_routes(served), metrics_routes(metrics)):
        app.include_router(routes)
    if isinstance(backend, ClusterBackend):
        app.include_router(cluster_routes(backend.router))
    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`anyorder-serve MODEL [--host] [--port] [--cluster] [--worker URL ...] ...`"""
    import argparse
    import sys

    from anyorder.export.sources import resolve_source
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
