"""The router's registry of workers: who hosts which block, who is banned until when (exponential
backoff, lifted only by a passed health probe), whose announcement expired, and how fast each
worker answers."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from anyorder.export.runtime import ExportError


@dataclass
class Worker:
    url: str
    blocks: frozenset
    announced: bool                      # heartbeats (True) or listed in the config (False)
    expires_at: float = math.inf         # announced: last heartbeat + its TTL
    banned_until: float = 0.0            # > now: banned; <= now but banned: waits for a probe
    banned: bool = False
    failures: int = 0                    # consecutive failures (the backoff's exponent)
    latency_s: Optional[float] = None    # moving average of successful hops
    hops: int = 0
    failed_hops: int = 0
    last_error: str = ""

    def usable(self, now: float) -> bool:
        return not self.banned and now < self.expires_at

    def view(self, now: float) -> dict:
        state = "live" if self.usable(now) else ("banned" if self.banned else "expired")
        return {"url": self.url, "blocks": sorted(self.blocks), "state": state,
                "announced": self.announced, "failures": self.failures,
                "banned_for_s": round(max(0.0, self.banned_until - now), 3) if self.banned else 0,
                "latency_ms": None if self.latency_s is None else round(self.latency_s * 1e3, 3),
                "hops": self.hops, "failed_hops": self.failed_hops, "last_error": self.last_error}


class WorkerRegistry:
    """Who hosts which block, who is banned until when, and how fast each worker answers."""

    def __init__(self, depth: int, ban_base_s: float = 0.5, ban_max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.depth = depth
        self.ban_base_s = ban_base_s
        self.ban_max_s = ban_max_s
        self.clock = clock
        self.workers: dict[str, Worker] = {}

    def _checked_blocks(self, url: str, blocks: Sequence[int]) -> frozenset:
        blocks = frozenset(int(b) for b in blocks)
        bad = sorted(b for b in blocks if not 0 <= b < self.depth)
        if bad or not blocks:
            raise ExportError(f"worker {url}: blocks {sorted(blocks)}; this model has blocks "
                              f"0..{self.depth - 1}")
        return blocks

    def announce(self, url: str, blocks: Sequence[int], ttl_s: float) -> Worker:
        """A heartbeat: register or refresh an announced worker (a ban stays in force: only a
        probe lifts it)."""
        blocks = self._checked_blocks(url, blocks)
        worker = self.workers.get(url)
        if worker is None:
            worker = self.workers[url] = Worker(url, blocks, announced=True)
        worker.blocks = blocks
        worker.expires_at = self.clock() + float(ttl_s)
        return worker

    def add_listed(self, url: str, blocks: Sequence[int]) -> Worker:
        worker = self.workers.get(url)
        if worker is None:
            worker = self.workers[url] = Worker(url, frozenset(), announced=False)
        worker.blocks = self._checked_blocks(url, blocks)
        return worker

    def hosts(self, block: int, exclude: Sequence[str] = ()) -> list[Worker]:
        now = self.clock()
        return [w for w in self.workers.values()
                if block in w.blocks and w.usable(now) and w.url not in exclude]

    def live_blocks(self) -> set[int]:
        now = self.clock()
        return {b for w in self.workers.values() if w.usable(now) for b in w.blocks}

    def ban(self, worker: Worker, reason: str) -> None:
        """Ban after a failure: base * 2**(failures - 1) seconds, capped. Failures seen while
        already banned (requests in flight when it broke) do not lengthen the ban."""
        worker.failed_hops += 1
        worker.last_error = reason
        if worker.banned:
            return
        worker.failures += 1
        worker.banned = True
        worker.banned_until = self.clock() + min(self.ban_max_s,
                                                 self.ban_base_s * 2 ** (worker.failures - 1))

    def probe_failed(self, worker: Worker, reason: str) -> None:
        """A banned worker whose ban ran out failed its probe: ban it again, twice as long."""
        worker.banned = False
        self.ban(worker, reason)

    def readmit(self, worker: Worker) -> None:
        worker.banned = False

    def succeeded(self, worker: Worker, seconds: float) -> None:
        worker.hops += 1
        worker.failures = 0
        worker.latency_s = seconds if worker.latency_s is None else \
            0.8 * worker.latency_s + 0.2 * seconds

    def due_for_probe(self) -> list[Worker]:
        """Banned workers whose ban ran out, and listed workers (checked every period)."""
        now = self.clock()
        return [w for w in self.workers.values()
                if (w.banned and w.banned_until <= now) or (not w.announced and not w.banned)]

    def expire(self) -> list[str]:
        now = self.clock()
        gone = [url for url, w in self.workers.items() if w.announced and w.expires_at <= now]
        for url in gone:
            del self.workers[url]
        return gone

    def view(self) -> list[dict]:
        now = self.clock()
        return [w.view(now) for w in sorted(self.workers.values(), key=lambda w: w.url)]
