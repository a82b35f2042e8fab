"""Where the service's blocks run: in this process (LocalBackend, the order-agnostic runtime) or
on block workers through the router (ClusterBackend); both answer a Prediction."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from anyorder.export.runtime import BlockRuntime
from anyorder.serving.router import DYNAMIC_ORDERS, DeadlineExceeded, Router

INLINE_BATCH = 4  # in-process backend: batches up to this run on the event loop (when idle)


@dataclass
class Prediction:
    logits: np.ndarray
    executed_order: list
    skipped: list
    requested_order: list
    hosts: list
    reasons: dict


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
