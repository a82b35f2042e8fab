"""Serving an export over HTTP.

- `service` (app assembly) and `service_routes` (its v2, image and health routes), with
  `backends` (in-process runtime or the cluster's router), `inputs` (decoding and bounding
  requests) and `metrics` (Prometheus);
- `worker` and `worker_routes`: a block worker speaking the Open Inference Protocol
  (`protocol`: its tensor format), `asgi`: what both apps share;
- `router` and `worker_registry`: running a request through whichever workers are alive;
- `cluster`: service + workers on loopback; `triton`: the blocks as a Triton repository.

Needs the `serve` extra (FastAPI, uvicorn, aiohttp, prometheus-client, python-multipart); the
rest of the library does not, so nothing here is imported by `anyorder` itself.
"""
