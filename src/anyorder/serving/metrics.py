"""The service's Prometheus metrics (requests, latency, images, blocks run and skipped, hops to
workers) and the ASGI middleware that counts and times every request."""

import time

from anyorder.serving.backends import Prediction


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
