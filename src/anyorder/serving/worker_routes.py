"""The worker's routes: the protocol's health, metadata and repository routes (Starlette `Route`s
over a BlockHost), and infer requests, the hot path, answered in plain ASGI before Starlette.
`anyorder.serving.worker.create_app` assembles them."""
from __future__ import annotations

from typing import Optional

import anyio
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anyorder.serving import protocol
from anyorder.serving.asgi import PayloadTooLarge
from anyorder.serving.worker import INLINE_BATCH, BlockHost


def error(status: int, message: str) -> Response:
    return Response(protocol.error_body(message), status, media_type="application/json")


def protocol_routes(host: BlockHost) -> list[Route]:
    """Everything but infer: health, server and model metadata, model readiness, the index."""

    def model_or_404(request):
        name = request.path_params["name"]
        problem = host.not_hosted(name, request.path_params.get("version", "1"))
        return name, (error(404, problem) if problem else None)

    async def live(request):
        return Response(status_code=200)

    async def metadata(request):
        return JSONResponse(host.server_metadata())

    async def model_metadata(request):
        name, missing = model_or_404(request)
        return missing or JSONResponse(host.model_metadata(name))

    async def model_ready(request):
        name, missing = model_or_404(request)
        return missing or Response(status_code=200)

    async def index(request):
        return JSONResponse(host.repository_index())

    return [
        Route("/v2/health/live", live), Route("/v2/health/ready", live), Route("/v2", metadata),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/repository/index", index, methods=["POST"]),
    ]


async def answer_infer(host: BlockHost, name: str, version: str, read_body, header_length
                       ) -> tuple[int, bytes, dict]:
    """(status, body, headers) of one infer request."""
    json_type = {"Content-Type": "application/json"}
    problem = host.not_hosted(name, version)
    if problem:
        return 404, protocol.error_body(problem), json_type
    try:
        message, tensors = protocol.decode_request(await read_body(), header_length)
        protocol.requested_outputs(message, ["tokens_out"])
        feed = host.check_inputs(name, tensors)
    except PayloadTooLarge as exc:
        return 413, protocol.error_body(str(exc)), json_type
    except protocol.ProtocolError as exc:
        return 400, protocol.error_body(str(exc)), json_type
    fail, garbage = host.chaos_draw()
    if host.chaos.delay_ms:
        await anyio.sleep(host.chaos.delay_ms / 1000)
    if fail:
        return 500, protocol.error_body("injected failure (--fail-rate)"), json_type
    if len(feed["tokens"]) <= INLINE_BATCH:
        tokens = host.infer(name, feed, garbage)  # shorter than a hand-off to a thread
    else:
        tokens = await anyio.to_thread.run_sync(host.infer, name, feed, garbage)
    body, headers = protocol.encode_response(name, {"tokens_out": tokens}, message)
    return 200, body, headers


def infer_first(host: BlockHost, routes_app):
    """The ASGI app answering infer requests itself and passing the rest to `routes_app`."""

    async def app(scope, receive, send):
        """Infer requests (the hot path) in plain ASGI, everything else through Starlette:
        routing, request and response objects cost more than decoding the tensors."""
        infer = _infer_target(scope)
        if infer is None:
            return await routes_app(scope, receive, send)
        header_length = next((value.decode("latin-1") for key, value in scope["headers"]
                              if key == b"inference-header-content-length"), None)

        async def read_body() -> bytes:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionResetError("the client went away")
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            return b"".join(chunks)

        try:
            status, body, headers = await answer_infer(host, *infer, read_body, header_length)
        except ConnectionResetError:
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
                    + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def _infer_target(scope) -> Optional[tuple[str, str]]:
    """(model, version) of a POST to /v2/models/<m>[/versions/<v>]/infer; None otherwise."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    parts = scope["path"].split("/")
    if parts[:3] != ["", "v2", "models"] or parts[-1] != "infer":
        return None
    if len(parts) == 5:
        return parts[3], "1"
    if len(parts) == 7 and parts[4] == "versions":
        return parts[3], parts[5]
    return None
