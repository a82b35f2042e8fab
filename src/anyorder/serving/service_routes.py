"""The service's routes, as FastAPI routers over one served model: health, the model list and
metadata, image uploads (v1), KServe v2 tensors, Prometheus metrics, and the worker
announcements of the cluster backend's router. `anyorder.serving.service.create_app` assembles
them."""

import json
from typing import Optional, Sequence

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from anyorder.errors import InputError
from anyorder.export.runtime import ExportError, MissingBlocksError
from anyorder.serving import protocol
from anyorder.serving.asgi import PayloadTooLarge
from anyorder.serving.backends import Prediction
from anyorder.serving.inputs import ImageError, Limits, Options, decode_image, tensor_images
from anyorder.serving.metrics import Metrics
from anyorder.serving.router import DeadlineExceeded, Router

KNOWN_FAILURES = (InputError, MissingBlocksError, DeadlineExceeded, PayloadTooLarge)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


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


def report(result: Prediction) -> dict:
    return {"executed_order": [int(i) for i in result.executed_order],
            "skipped": [int(i) for i in result.skipped],
            "skipped_why": {str(k): v for k, v in result.reasons.items()},
            "requested_order": [int(i) for i in result.requested_order],
            "hosts": result.hosts}


class ServedModel:
    """What the routes of one service share: the backend, the limits, the metrics, and the names
    the model answers to (its manifest name, then `aliases`)."""

    def __init__(self, backend, limits: Limits, metrics: Metrics, aliases: Sequence[str] = ()):
        self.backend = backend
        self.limits = limits
        self.metrics = metrics
        self.manifest = backend.manifest
        self.name = self.manifest["name"]
        self.names = [self.name, *(a for a in aliases if a != self.name)]

    def check_model(self, model: str) -> Optional[JSONResponse]:
        if model not in self.names:
            return error(404, f"model {model!r} is not served here; this service serves "
                              f"{' or '.join(map(repr, self.names))} (GET /v1/models)")
        return None

    async def predict(self, images: np.ndarray, options: Options) -> Prediction:
        result = await self.backend.run(images, options.order, options.seed, options.policy,
                                        options.exclude, options.deadline_s)
        self.metrics.prediction(result, len(images))
        return result


def health_routes(served: ServedModel) -> APIRouter:
    """GET /health/live, /health/ready."""
    routes = APIRouter()
    backend = served.backend

    @routes.get("/health/live")
    async def live():
        return {"status": "live"}

    @routes.get("/health/ready")
    async def ready():
        if backend.ready:
            return {"status": "ready"}
        return error(503, "no block can run yet (no live worker hosts any block)")

    return routes


def model_routes(served: ServedModel) -> APIRouter:
    """GET /v1/models, /v1/models/<name>: the names served, the manifest and the blocks."""
    routes = APIRouter()
    backend, limits, manifest = served.backend, served.limits, served.manifest

    @routes.get("/v1/models")
    async def models():
        return {"models": served.names}

    @routes.get("/v1/models/{model}")
    async def metadata(model: str):
        missing = served.check_model(model)
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

    return routes


def image_routes(served: ServedModel) -> APIRouter:
    """POST /v1/models/<name>/predict: PNG/JPEG uploads in, predictions and the report out."""
    routes = APIRouter()
    backend, limits, manifest, name = served.backend, served.limits, served.manifest, served.name

    @routes.post("/v1/models/{model}/predict")
    async def predict_images(model: str, request: Request):
        missing = served.check_model(model)
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
            result = await served.predict(backend.preprocess(images), options)
        except KNOWN_FAILURES as exc:
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

    return routes


def v2_routes(served: ServedModel) -> APIRouter:
    """The protocol's routes: POST /v2/models/<name>/infer, GET /v2/health/ready and
    /v2/models/<name>, so v2 clients can use the service as well."""
    routes = APIRouter()
    backend, limits, manifest, name = served.backend, served.limits, served.manifest, served.name

    @routes.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        missing = served.check_model(model)
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
            result = await served.predict(tensor_images(manifest, tensors, limits.max_images,
                                                        backend.preprocess), options)
        except KNOWN_FAILURES as exc:
            return failure(exc)
        values = {"logits": result.logits.astype(np.float32),
                  "class_index": result.logits.argmax(axis=1).astype(np.int64)}
        as_text = {key: json.dumps(value) for key, value in report(result).items()}
        body, headers = protocol.encode_response(name, {k: values[k] for k in outputs}, message,
                                                 parameters=as_text,
                                                 version=str(manifest["version"]))
        return Response(body, 200, headers=headers)

    @routes.get("/v2/health/ready")
    async def v2_ready():
        return Response(status_code=200 if backend.ready else 503)

    @routes.get("/v2/models/{model}")
    async def v2_metadata(model: str):
        missing = served.check_model(model)
        if missing:
            return missing
        size = int(manifest["image_size"])
        return {"name": name, "versions": [str(manifest["version"])], "platform": "anyorder",
                "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
                "outputs": [{"name": "logits", "datatype": "FP32",
                             "shape": [-1, int(manifest["num_classes"])]},
                            {"name": "class_index", "datatype": "INT64", "shape": [-1]}]}

    return routes


def metrics_routes(metrics: Metrics) -> APIRouter:
    """GET /metrics: Prometheus text."""
    routes = APIRouter()

    @routes.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    return routes


def cluster_routes(router: Router) -> APIRouter:
    """POST /router/announce (worker heartbeats), GET /router/workers (the registry)."""
    routes = APIRouter()

    @routes.post("/router/announce")
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

    @routes.get("/router/workers")
    async def workers():
        return {"workers": router.registry.view(),
                "live_blocks": sorted(router.registry.live_blocks())}

    return routes
