"""Prometheus metrics of the daemon and its engine, and the HTTP endpoint that serves them.

Names carry the `moed_` prefix and base units (seconds, bytes, ratios 0..1); counters end in
`_total`. Every series carries `model_name` (the served name), as vLLM's and sglang's do, added at
collection time so no call site repeats it; `moed_build_info` (always 1) names the version.
Request phases follow vLLM's definitions: queue = daemon receipt -> the engine first schedules the
request (admission, tokenising and the engine's waiting queue), prefill = that -> first token,
decode = first -> last token. The engine reports cumulative counts since its worker started; they become counters here
by adding the increase since the previous report, so a worker restart (counts back to zero) never
makes a counter go down. The HTTP server (asyncio, in the daemon's loop) answers
`GET /metrics` (text exposition), `/health` (200 while the daemon's serving loops make progress, the
systemd watchdog's condition, else 503 with the stuck ones as the body) and `/ready` (200 when also
the engine is ready and the daemon is not draining, else 503 with the reason as the body).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import platform
import typing
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily

from moed.engine.config import ResolvedMissService
from moed.engine.protocol import EngineStats

log = logging.getLogger(__name__)
disable_created_metrics()  # `_created` series double the exposition and no dashboard reads them

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640)
ITL_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10)
DISPATCH_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
FINISH_REASONS = ("stop", "length", "abort", "deadline", "error")
PHASE_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1,
    1.5,
    2,
    2.5,
    5,
    10,
    15,
    20,
    30,
    40,
    50,
    60,
    120,
    240,
    480,
    960,
    1920,
    7680,
)
MISS_SERVICE_LABELS = typing.get_args(ResolvedMissService)
ENGINE_STATES = ("starting", "loading", "ready", "restarting", "crash_loop", "failed", "stopping", "stopped")


class LoopHistogram:
    """A histogram for the per-token path: bucket counts in a list and no lock, because the daemon's
    event loop is its only writer (prometheus_client's Histogram takes a lock per observation).
    Exported in the same form, `<name>_bucket{le}`, `_sum`, `_count`, by a registry collector."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = [float(b) for b in buckets]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float, n: int = 1) -> None:
        """Record `n` observations of `value`."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative = list(itertools.accumulate(self.counts))
        buckets = [(repr(b), c) for b, c in zip(self.bounds, cumulative)] + [("+Inf", cumulative[-1])]
        family.add_metric([], buckets, sum_value=self.sum)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)


def moed_version() -> tuple[str, str]:
    """(package version, git revision of the checkout it runs from, or "")."""
    try:
        version = metadata.version("moed")
    except metadata.PackageNotFoundError:
        version = "unknown"
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = git / ref
            if not path.is_file():  # a worktree's branches live in the common directory
                path = Path((git / "commondir").read_text().strip())
                path = (git / path / ref) if not path.is_absolute() else path / ref
            head = path.read_text().strip()
        return version, head[:12]
    except (OSError, IndexError):
        return version, ""


class _ModelNameLabel:
    """The registry seen by scrapes: every sample of `inner` with model_name added."""

    def __init__(self, inner: CollectorRegistry, model_name: str):
        self.inner, self.model_name = inner, model_name

    def collect(self) -> Iterator:
        for family in self.inner.collect():
            family.samples = [s._replace(labels={"model_name": self.model_name, **s.labels}) for s in family.samples]
            yield family


class Metrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.scraped = CollectorRegistry(auto_describe=False)
        self.scraped.register(_ModelNameLabel(r, model_name))  # type: ignore[arg-type]
        self.version, revision = moed_version()
        Info("moed_build", "moed's version, the git revision it runs from, and Python's", registry=r).info(
            {"version": self.version, "revision": revision, "python": platform.python_version()}
        )
        self.requests = Counter(
            "moed_requests", "Generate requests finished, by finish reason", ["finish_reason"], registry=r
        )
        for reason in FINISH_REASONS:
            self.requests.labels(reason)
        self.rejected = Counter(
            "moed_requests_rejected", "Generate requests refused at admission, by error code", ["code"], registry=r
        )
        self.protocol_errors = Counter(
            "moed_protocol_errors",
            "Client messages refused: malformed, unsupported version, too large, or an invalid field",
            ["code"],
            registry=r,
        )
        self.ttft = Histogram(
            "moed_time_to_first_token_seconds",
            "Request receipt to first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = LoopHistogram(
            "moed_inter_token_latency_seconds", "Time between generated tokens of a request", ITL_BUCKETS, r
        )
        self.e2e = Histogram(
            "moed_e2e_request_latency_seconds", "Request receipt to its final reply", buckets=E2E_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "moed_request_queue_time_seconds",
            "Request receipt to its first scheduling in the engine (admission, tokenising, engine queue)",
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "moed_request_prefill_time_seconds", "First scheduling to first token", buckets=PHASE_BUCKETS, registry=r
        )
        self.decode_time = Histogram(
            "moed_request_decode_time_seconds", "First to last generated token", buckets=PHASE_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("moed_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("moed_generation_tokens", "Tokens generated", registry=r)
        self.in_flight = Gauge("moed_requests_in_flight", "Generate requests the daemon holds", registry=r)
        self.running = Gauge("moed_requests_running", "Requests running in the engine", registry=r)
        self.waiting = Gauge("moed_requests_waiting", "Requests waiting in the engine", registry=r)
        self.kv_usage = Gauge("moed_kv_cache_usage_ratio", "Fraction of KV pages in use (0..1)", registry=r)
        self.step = LoopHistogram(
            "moed_step_duration_seconds", "Engine step time (steps that produced tokens)", STEP_BUCKETS, r
        )
        self.step_phase = Gauge(
            "moed_step_phase_seconds", "Engine step time breakdown over the last stats window", ["phase"], registry=r
        )
        self.preemptions = Counter("moed_preemptions", "Sequences preempted for KV space", registry=r)
        self.spec_draft = Counter("moed_spec_draft_tokens", "Draft tokens proposed by MTP", registry=r)
        self.spec_accepted = Counter("moed_spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.numerical_faults = Counter(
            "moed_numerical_faults", "Requests stopped with an error because their logits were not finite", registry=r
        )
        layer = ["layer"]
        self.expert_hits = Counter(
            "moed_expert_cache_hits", "Expert lookups served from the GPU cache", layer, registry=r
        )
        self.expert_misses = Counter(
            "moed_expert_cache_misses", "Expert lookups missing the GPU cache", layer, registry=r
        )
        self.expert_copy_bytes = Counter("moed_expert_copy_bytes", "Expert bytes copied host to GPU", layer, registry=r)
        self.expert_cpu_bytes = Counter(
            "moed_expert_cpu_bytes", "Expert bytes read by CPU-computed experts", layer, registry=r
        )
        self.expert_evictions = Counter(
            "moed_expert_cache_evictions", "Experts evicted from the GPU cache", layer, registry=r
        )
        self.expert_stall = Counter(
            "moed_expert_stall_seconds", "Time steps waited for expert copies", layer, registry=r
        )
        self.expert_cpu = Counter("moed_expert_cpu_computed", "Experts computed on the CPU", layer, registry=r)
        self.miss_service = Gauge(
            "moed_expert_miss_service",
            f"1 for the policy serving expert misses in decode ({', '.join(MISS_SERVICE_LABELS)})",
            ["policy"],
            registry=r,
        )
        self.miss_service_rate = Gauge(
            "moed_expert_miss_service_rate_bytes_per_second",
            "Rates the hybrid split uses: CPU experts (re-measured under load) and copies",
            ["path"],
            registry=r,
        )
        self.expert_pinned = Gauge(
            "moed_expert_pinned", "Experts pinned in the GPU cache (placement manager)", layer, registry=r
        )
        self.placement_changes = Counter(
            "moed_placement_pin_changes", "Pins and unpins the placement manager applied in the engine", registry=r
        )
        self.placement_syncs = Counter("moed_placement_syncs", "Placement plans sent to the engine", registry=r)
        self.worker_restarts = Counter(
            "moed_worker_restarts", "Engine worker restarts after a crash or stall", registry=r
        )
        self.ready = Gauge("moed_ready", "1 when the daemon accepts generate requests", registry=r)
        self.engine_state = Gauge("moed_engine_state", "1 for the engine's current state", ["state"], registry=r)
        self.clients = Gauge("moed_clients_connected", "Client connections", registry=r)
        self.backlog = Gauge("moed_client_backlog_messages", "Replies queued for clients that read slowly", registry=r)
        self.clients_dropped = Counter(
            "moed_clients_dropped", "Clients dropped: queue overflow or heartbeat timeout", ["reason"], registry=r
        )
        self.dispatch = LoopHistogram(
            "moed_daemon_dispatch_seconds",
            "Engine output frame receipt to every reply it caused being handed to ZMQ",
            DISPATCH_BUCKETS,
            r,
        )
        self.dispatch_tokens = Counter(
            "moed_daemon_dispatch_tokens", "Tokens in engine output frames dispatched", registry=r
        )
        self.http_requests = Counter(
            "moed_http_requests",
            "HTTP API requests answered, by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.set_state("starting")
        self._last: dict[tuple, float] = {}
        self._generation = -1

    def set_state(self, state: str) -> None:
        for s in ENGINE_STATES:
            self.engine_state.labels(s).set(1.0 if s == state else 0.0)

    def _increase(self, counter: Counter, key: tuple, value: float) -> None:
        last = self._last.get(key, 0.0)
        if value > last:
            counter.inc(value - last)
        self._last[key] = value

    def observe_engine_stats(self, stats: EngineStats, generation: int) -> None:
        """Update gauges and counters from one EngineStats of worker incarnation `generation`."""
        if generation != self._generation:  # a new worker counts from zero
            self._last.clear()
            self._generation = generation
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        for phase, seconds in stats.step_time_s.items():
            self.step_phase.labels(phase).set(seconds)
        self._increase(self.preemptions, ("preemptions",), stats.preemptions)
        self._increase(self.spec_draft, ("spec_draft",), stats.spec_draft_tokens)
        self._increase(self.spec_accepted, ("spec_accepted",), stats.spec_accepted_tokens)
        self._increase(self.numerical_faults, ("numerical_faults",), stats.numerical_faults)
        if stats.miss_service:
            for policy in MISS_SERVICE_LABELS:
                self.miss_service.labels(policy).set(1 if policy == stats.miss_service else 0)
        for path, rate in stats.miss_service_rates_Bps.items():
            self.miss_service_rate.labels(path).set(rate)
        for e in stats.experts:
            layer = str(e.layer)
            for counter, name, value in (
                (self.expert_hits, "hits", e.hits),
                (self.expert_misses, "misses", e.misses),
                (self.expert_copy_bytes, "copy", e.bytes_copied),
                (self.expert_cpu_bytes, "cpu_bytes", e.bytes_cpu),
                (self.expert_evictions, "evictions", e.evictions),
                (self.expert_stall, "stall", e.stall_s),
                (self.expert_cpu, "cpu", e.cpu_experts),
            ):
                self._increase(counter.labels(layer), (name, layer), value)

    def observe_placement(self, pinned: dict[str, list[int]], changes: int) -> None:
        """After the placement manager made the engine's pins its plan: pins per layer, pins changed."""
        for layer, experts in pinned.items():
            self.expert_pinned.labels(layer).set(len(experts))
        self.placement_changes.inc(changes)
        self.placement_syncs.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.scraped)


class MetricsServer:
    """A minimal HTTP/1.1 server (one request per connection) for /metrics, /health and /ready."""

    def __init__(
        self,
        metrics: Metrics,
        readiness: Callable[[], tuple[bool, str]],
        health: Callable[[], tuple[bool, str]] = lambda: (True, ""),
    ):
        self.metrics = metrics
        self.readiness = readiness
        self.health = health
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            while True:  # headers are not needed; read them so the client is not reset
                h = await asyncio.wait_for(reader.readline(), 10.0)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.metrics.exposition()
            elif path == "/health":
                ok, reason = self.health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", (b"ok\n" if ok else f"not live: {reason}\n".encode())
            elif path == "/ready":
                ok, reason = self.readiness()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", (b"ready\n" if ok else f"not ready: {reason}\n".encode())
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"paths: /metrics /health /ready\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
