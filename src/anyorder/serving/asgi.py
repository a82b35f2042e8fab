"""What the service and the worker share as ASGI apps: a request-size limit, JSON errors, and
starting uvicorn on a socket bound first (so port 0 works and the real URL is known before the
first request)."""
from __future__ import annotations

import json
import signal
import socket
import sys
from typing import Callable, Optional

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator says otherwise


class PayloadTooLarge(Exception):
    """A body longer than the app accepts (HTTP 413)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body exceeds {limit} bytes; send fewer or smaller images "
                         f"(or start the server with a larger --max-body-mb)")


class BodyLimit:
    """ASGI middleware: a declared Content-Length above `max_bytes` is answered 413 at once; a
    body that grows past it while being read raises PayloadTooLarge in the handler (the app maps
    it to 413), so no handler ever holds more than `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await send_json(send, 400, {"error": "Content-Length is not a number"})
                if declared > self.max_bytes:
                    return await send_json(send, 413,
                                           {"error": str(PayloadTooLarge(self.max_bytes))})
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        return await self.app(scope, limited_receive, send)


async def send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every response with a body waits ~40 ms (Nagle meets delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port} ({exc.strerror}); pick another "
                         f"--port (0: any free port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def run(app, sock: socket.socket, on_ready: Optional[Callable[[str], None]] = None,
        log_level: str = "warning") -> None:
    """Serve `app` with uvicorn on the bound socket until SIGINT/SIGTERM. Prints one JSON line
    {"url": ...} on stdout first, for whoever started the process."""
    import uvicorn

    url = url_of(sock)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it
    # found: make that handler an exit, so `finally` blocks (stopping child workers) still run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # proxy_headers off: we sit behind no proxy, and the middleware costs on every request.
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=3, timeout_keep_alive=30,
                            proxy_headers=False)
    server = uvicorn.Server(config)
    print(json.dumps({"url": url}), flush=True)
    if on_ready is not None:
        on_ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        sys.stdout.flush()
