"""The router: runs a model whose blocks live in worker processes that come, go, hang and lie.

It keeps the stem and the head (small, needed by every request) in-process, like Petals' client
keeps the embeddings and the LM head, and sends the tokens through one block at a time, each hop
an Open Inference Protocol (KServe v2) call to any live worker hosting that block:

- a registry of workers: announced ones (heartbeats, `POST /router/announce`, expiring after their
  TTL) and listed ones (`--worker URL`, any v2 server: their blocks are discovered through the
  repository index or each block's ready route, and they are health-checked);
- the next block is the next of the requested order (`sequential`, `random` with a seed, or
  explicit indices), or, with order `any` / `fastest`, any unused block that has a live host
  (random, or the one whose best host has the lowest measured latency): blocks are stateless, so
  unlike Petals there are no spans to keep contiguous and no cache to replay;
- each hop has a timeout (the smaller of `hop_timeout_s` and what the request's deadline leaves);
  a worker that times out, refuses, errs, or answers tokens of the wrong shape/dtype or with
  NaN/inf is banned with exponential backoff (`ban_base_s` doubling up to `ban_max_s`), the hop is
  retried on another host of the same block (at most `attempts` hosts), and a banned worker is
  used again only after its ban ran out *and* a health probe passed;
- a block that no host could run is missing, and the block policy decides (`skip`, `fail`,
  `min_blocks:K`, as in the in-process runtime); a request that runs out of deadline skips what
  is left (or fails, under `fail`); no request outlives its deadline by more than the head's run.

Every result says which blocks ran in which order, which were skipped and why, and which worker
ran each hop. Nothing a worker returns is used before its shape, dtype and finiteness are checked.
The HTTP client is aiohttp: the hop is the hot path (the target is <= 1 ms of overhead per hop on
loopback), and aiohttp is the faster mature asyncio client (bench/serving_bench.py).
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from anyorder.export.runtime import BlockRuntime, ExportError, MissingBlocksError, Policy, read_manifest
from anyorder.serving import protocol
from anyorder.serving.worker import block_index, block_name
from anyorder.serving.worker_registry import Worker, WorkerRegistry

DYNAMIC_ORDERS = ("any", "fastest")
SELECTIONS = ("random", "fastest")
HEAD_RESERVE_S = 0.02  # deadline time kept back for the head and the answer
INLINE_BATCH = 8       # stem and head run on the event loop up to this batch


class DeadlineExceeded(RuntimeError):
    """The request's deadline ran out before its policy could be satisfied."""


class HopError(Exception):
    """One hop failed; `reason` says how (timeout, connection, status, bad output)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ClusterResult:
    logits: np.ndarray
    executed_order: list[int]
    skipped: list[int]
    requested_order: list[int]
    hosts: list[str]                               # the worker of each executed block
    reasons: dict = field(default_factory=dict)    # skipped block -> why
    attempts: int = 0                              # hops tried, failed ones included

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


class Router:
    """Runs requests through the blocks of the workers in its registry (module docstring).

    export_dir: the export whose stem and head run here and whose blocks the workers host
    (announcements of another model version are refused). workers: URLs of listed workers.
    select: how a host of a block is chosen, "random" or "fastest" (lowest moving-average
    latency, unmeasured ones first). on_hop(url, block, outcome, seconds): a hook for metrics.
    """

    def __init__(self, export_dir: Union[str, Path], workers: Sequence[str] = (),
                 hop_timeout_s: float = 1.0, ban_base_s: float = 0.5, ban_max_s: float = 30.0,
                 attempts: int = 3, select: str = "random", probe_interval_s: float = 0.5,
                 probe_timeout_s: float = 0.5, threads: Optional[int] = None,
                 on_hop: Optional[Callable] = None):
        if select not in SELECTIONS:
            raise ExportError(f"select {select!r}: use {' or '.join(SELECTIONS)}")
        for name, value in (("hop_timeout_s", hop_timeout_s), ("ban_base_s", ban_base_s),
                            ("probe_interval_s", probe_interval_s),
                            ("probe_timeout_s", probe_timeout_s)):
            if not value > 0:
                raise ExportError(f"{name} {value}: must be > 0")
        if attempts < 1:
            raise ExportError(f"attempts {attempts}: must be >= 1")
        self.manifest = read_manifest(export_dir)
        self.depth = int(self.manifest["depth"])
        # Stem and head only: every block is somebody else's.
        self.local = BlockRuntime(export_dir, exclude=range(self.depth), threads=threads,
                                  compose_cache=0)
        self.slotted = self.local.slotted
        self.tokens_shape = (int(self.manifest["num_tokens"]), int(self.manifest["embed_dim"]))
        self.registry = WorkerRegistry(self.depth, ban_base_s, ban_max_s)
        self.listed = list(workers)
        self.hop_timeout_s = hop_timeout_s
        self.attempts = attempts
        self.select = select
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.on_hop = on_hop or (lambda *args: None)
        self._random = random.Random(0)  # host choice only: it never changes a result
        self._session = None
        self._prober: Optional[asyncio.Task] = None

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=512, limit_per_host=64, keepalive_timeout=30)
        # No cookies, no compression, no default headers to negotiate: a hop is a bare POST.
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"))
        for url in self.listed:
            await self._probe(url)
        self._prober = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            try:
                await self._prober
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()

    def announce(self, url: str, blocks: Sequence[int], ttl_s: float, version: str) -> Worker:
        """A worker's heartbeat; ExportError if it hosts another model version."""
        if version != self.manifest["version"]:
            raise ExportError(f"worker {url} hosts model version {version!r}; this router runs "
                              f"{self.manifest['name']} version {self.manifest['version']!r}")
        if not 0 < float(ttl_s) <= 3600:
            raise ExportError(f"worker {url}: ttl_s {ttl_s} must be in (0, 3600]")
        return self.registry.announce(url.rstrip("/"), blocks, ttl_s)

    @property
    def ready(self) -> bool:
        return bool(self.registry.live_blocks())

    # -- health ----------------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            self.registry.expire()
            due = {w.url for w in self.registry.due_for_probe()} | \
                {url for url in self.listed if url not in self.registry.workers}
            await asyncio.gather(*(self._probe(url) for url in due), return_exceptions=True)

    async def _get(self, url: str, method: str = "GET"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.probe_timeout_s)
        async with self._session.request(method, url, timeout=timeout) as response:
            return response.status, (await response.read())

    async def _probe(self, url: str) -> None:
        """Health-check a worker; a listed one also (re)discovers its blocks."""
        worker = self.registry.workers.get(url)
        try:
            status, _ = await self._get(f"{url}/v2/health/ready")
            if status != 200:
                raise HopError(f"not ready (status {status})")
            if worker is None or not worker.announced:
                worker = self.registry.add_listed(url, await self._discover(url))
        except (HopError, ExportError, OSError, asyncio.TimeoutError) as exc:
            if worker is not None:
                self.registry.probe_failed(worker, f"probe: {exc or type(exc).__name__}")
            return
        self.registry.readmit(worker)

    async def _discover(self, url: str) -> list[int]:
        """The blocks a v2 server hosts: its repository index where it has one (Triton, ours),
        else each block's ready route; each found block's metadata must match our tokens."""
        import json

        names: list[str] = []
        status, body = await self._get(f"{url}/v2/repository/index", "POST")
        if status == 200:
            names = [entry.get("name", "") for entry in json.loads(body)
                     if entry.get("state", "READY") == "READY"]
        else:
            for index in range(self.depth):
                status, _ = await self._get(f"{url}/v2/models/{block_name(index)}/ready")
                if status == 200:
                    names.append(block_name(index))
        blocks = sorted(i for i in map(block_index, names) if i is not None and i < self.depth)
        if not blocks:
            raise HopError("hosts none of this model's blocks")
        status, body = await self._get(f"{url}/v2/models/{block_name(blocks[0])}")
        inputs = json.loads(body).get("inputs", []) if status == 200 else []
        shape = next((i.get("shape") for i in inputs if i.get("name") == "tokens"), None)
        if shape is None or [int(d) for d in shape[1:]] != list(self.tokens_shape):
            raise HopError(f"its blocks take tokens {shape}, this model's are "
                           f"[-1, {self.tokens_shape[0]}, {self.tokens_shape[1]}]")
        return blocks

    # -- one hop ---------------------------------------------------------------------------------
    async def hop(self, url: str, block: int, tokens: np.ndarray, slot: int,
                  timeout_s: float) -> np.ndarray:
        """Block `block` on worker `url`: tokens in, checked tokens out; HopError otherwise."""
        import aiohttp

        feed = {"tokens": tokens}
        if self.slotted:
            feed["slot"] = np.array([slot], np.int64)
        body, headers = protocol.encode_request(feed, ["tokens_out"], binary=True)
        target = f"{url}/v2/models/{block_name(block)}/infer"
        try:
            async with self._session.post(target, data=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)
                                          ) as response:
                payload = await response.read()
                if response.status != 200:
                    raise HopError(f"status {response.status}: {payload[:200].decode('utf-8', 'replace')}")
                header = response.headers.get(protocol.HEADER_LENGTH)
        except asyncio.TimeoutError:
            raise HopError(f"timeout after {timeout_s * 1e3:.0f} ms") from None
        except aiohttp.ClientError as exc:
            raise HopError(f"connection: {type(exc).__name__} {exc}") from None
        try:
            _, outputs = protocol.decode_response(payload, header)
        except protocol.ProtocolError as exc:
            raise HopError(f"bad answer: {exc}") from None
        out = outputs.get("tokens_out")
        if out is None or out.dtype != np.float32 or out.shape != tokens.shape:
            raise HopError(f"bad answer: tokens_out "
                           f"{None if out is None else (str(out.dtype), list(out.shape))}, "
                           f"expected float32 {list(tokens.shape)}")
        if not np.isfinite(out).all():
            raise HopError("bad answer: tokens_out has NaN or infinite values")
        return out

    def _choose_host(self, hosts: list[Worker]) -> Worker:
        if self.select == "fastest":
            return min(hosts, key=lambda w: (w.latency_s or 0.0, self._random.random()))
        return self._random.choice(hosts)

    async def _run_block(self, block: int, tokens: np.ndarray, slot: int, deadline: float
                         ) -> tuple[Optional[np.ndarray], Optional[str], str, int]:
        """(tokens, worker url, why not, attempts): the block on up to `attempts` hosts."""
        tried: list[str] = []
        reason = "no live worker hosts it"
        for _ in range(self.attempts):
            hosts = self.registry.hosts(block, exclude=tried)
            if not hosts:
                break
            timeout = min(self.hop_timeout_s, deadline - time.monotonic() - HEAD_RESERVE_S)
            if timeout <= 0:
                reason = "the request's deadline ran out"
                break
            worker = self._choose_host(hosts)
            tried.append(worker.url)
            started = time.monotonic()
            try:
                out = await self.hop(worker.url, block, tokens, slot, timeout)
            except HopError as exc:
                self.registry.ban(worker, exc.reason)
                self.on_hop(worker.url, block, "failed", time.monotonic() - started)
                reason = f"{worker.url}: {exc.reason}"
                continue
            elapsed = time.monotonic() - started
            self.registry.succeeded(worker, elapsed)
            self.on_hop(worker.url, block, "ok", elapsed)
            return out, worker.url, "", len(tried)
        return None, None, reason, len(tried)

    def _next_dynamic(self, pending: list[int], mode: str, rng: np.random.Generator
                      ) -> Optional[int]:
        """order any/fastest: an unused block with a live host (random, or best latency)."""
        reachable = [b for b in pending if self.registry.hosts(b)]
        if not reachable:
            return None
        if mode == "fastest":
            return min(reachable, key=lambda b: min(w.latency_s or 0.0
                                                    for w in self.registry.hosts(b)))
        return reachable[int(rng.integers(len(reachable)))]

    async def _local(self, session, feed: dict):
        """The stem or the head, here: on the event loop for a small batch (a tenth of a
        millisecond, less than a thread hand-off), in a thread for a large one."""
        import anyio

        if len(next(iter(feed.values()))) <= INLINE_BATCH:
            return session.run(None, feed)
        return await anyio.to_thread.run_sync(session.run, None, feed)

    @staticmethod
    def _check_outcome(policy: Policy, executed: list[int], skipped: list[int], reasons: dict,
                       deadline_s: float) -> None:
        """The policy on what ran: DeadlineExceeded when it is unmet and the deadline skipped
        blocks, else MissingBlocksError with why each block was skipped."""
        try:
            policy.check(executed, skipped)
        except MissingBlocksError as exc:
            if any("deadline" in reasons.get(b, "") for b in skipped):
                raise DeadlineExceeded(f"{exc} (the deadline of {deadline_s:.3f} s ran out)"
                                       ) from None
            raise MissingBlocksError(f"{exc}: {reasons}") from None

    # -- one request -----------------------------------------------------------------------------
    async def run(self, images: np.ndarray, order: Union[str, Sequence[int]] = "sequential",
                  seed: Optional[int] = None, policy: Union[str, Policy] = "skip",
                  exclude: Sequence[int] = (), deadline_s: float = 10.0) -> ClusterResult:
        """Normalised float32 images (N, 3, H, W) -> ClusterResult. Bad input raises
        ExportError, an unmet policy MissingBlocksError, both before any compute where they can
        be known then; DeadlineExceeded when the deadline leaves the policy unmet."""
        deadline = time.monotonic() + deadline_s
        policy = Policy.parse(policy)
        images = self.local.check_normalised(images)
        excluded = self.local.check_exclude(exclude)
        dynamic = isinstance(order, str) and order in DYNAMIC_ORDERS
        requested = [i for i in range(self.depth)] if dynamic else \
            self.local.requested_order(order, seed)
        pending = [i for i in requested if i not in excluded]
        skipped = [i for i in requested if i in excluded]
        reasons = {i: "excluded by the caller" for i in skipped}
        unreachable = [i for i in pending if not self.registry.hosts(i)]
        policy.check([i for i in pending if i not in unreachable], skipped + unreachable)

        tokens = (await self._local(self.local.stem, {"images": images}))[0]
        executed, hosts, attempts = [], [], 0
        rng = np.random.default_rng(seed)
        while pending:
            if deadline - time.monotonic() <= HEAD_RESERVE_S:
                for block in pending:
                    reasons[block] = "the request's deadline ran out"
                skipped += pending
                break
            if dynamic:
                block = self._next_dynamic(pending, order, rng)
                if block is None:
                    for missing in pending:
                        reasons[missing] = "no live worker hosts it"
                    skipped += pending
                    break
                pending.remove(block)
            else:
                block = pending.pop(0)
            out, url, reason, tries = await self._run_block(block, tokens, len(executed),
                                                            deadline)
            attempts += tries
            if out is None:
                skipped.append(block)
                reasons[block] = reason
                if policy.kind == "fail" or (policy.kind == "min_blocks" and
                                             len(executed) + len(pending) < policy.min_blocks):
                    break  # the policy cannot be met any more: stop spending hops
                continue
            tokens = out
            executed.append(block)
            hosts.append(url)
        self._check_outcome(policy, executed, skipped, reasons, deadline_s)
        logits = (await self._local(self.local.head, {"tokens": tokens}))[0]
        if dynamic:
            requested = executed + skipped
        return ClusterResult(logits, executed, skipped, requested, hosts,
                             {int(k): v for k, v in reasons.items()}, attempts)
