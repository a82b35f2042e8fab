"""Serving an export over HTTP: the service (`service`), block workers speaking the Open Inference
Protocol (`worker`, `protocol`), the router that runs requests through whichever workers are
alive (`router`), and a local cluster on loopback (`cluster`).

Needs the `serve` extra (FastAPI, uvicorn, aiohttp, prometheus-client, python-multipart); the
rest of the library does not, so nothing here is imported by `anyorder` itself.
"""
