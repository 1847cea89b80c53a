"""The daemon: a ZMQ ROUTER for clients, the request table, and the glue to the engine worker.

Everything runs in one asyncio loop and nothing in it waits on compute: admission (daemon/admission.py)
tokenises long prompts in a thread, the engine is another process. Replies leave through per-client
outboxes (daemon/clients.py), so nothing a slow or broken client does can delay replies to others.
Every serving task runs under the liveness registry's guard (daemon/liveness.py), and the watchdog,
/ready and /health believe only the loops' progress: the frontend's is proven by a Health message
that an in-process socket sends through the ROUTER every third of `loop_stale_s`.

A client loses its requests (engine Abort, no reply) when its connection drops: the socket
monitor reports a disconnect, and sending it a Pong then fails with EHOSTUNREACH; or when it sends
nothing (heartbeats included) for `client_timeout_s` while it has requests in flight.

Local clients (the HTTP API, daemon/openai_api.py) use the same admission, limits and request
table: their messages go through `submit` as decoded ZMQ messages do, and their replies are handed
to a `deliver` callback instead of the socket. Their identity is empty, which no ZMQ peer can have.
A request with n choices is n engine requests under one client request id (`ClientState.requests`
holds its choices still running); an Error ends the request, its other choices are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge
from zmq.utils.monitor import parse_monitor_message

from moed.client import protocol as cp
from moed.daemon import memory
from moed.daemon.admission import Admission
from moed.daemon.clients import ClientState, Outboxes
from moed.daemon.config import ServeConfig
from moed.daemon.detokenizer import IncrementalDetokenizer
from moed.daemon.glm_chat import ChatOutputParser
from moed.daemon.liveness import Liveness
from moed.daemon.metrics import Metrics, MetricsServer
from moed.daemon.placement import (
    DaemonPlacement,
    PlacementChannel,
    PlacementFactory,
    PlacementManager,
    PlacementUnavailable,
)
from moed.daemon.request import EngineUpdate, GenerateRequest
from moed.daemon.sdnotify import Notifier
from moed.daemon.supervisor import WorkerSupervisor
from moed.daemon.tokenizer import TextTokenizer
from moed.engine import protocol as ep

if TYPE_CHECKING:
    from moed.daemon.openai_api import OpenAIServer

log = logging.getLogger(__name__)

# A client's replies of one step go out in messages of this many, as soon as they are ready, so its first
# streams do not wait for the step's last token to be handled (docs/benchmarks.md "Serving").
STEP_SEND_EVERY = 16
HOUSEKEEPING_S = 0.25
PROBE_INTERVAL_S = 2.0  # Pong probe of clients with requests: a gone one fails with EHOSTUNREACH
CUTOFF_MIN_BYTES = 32 << 20  # messages up to this size are answered (too large), whatever max_message_bytes is
LOOP_STALE_S = 5.0  # a serving loop without progress (or an unanswered probe) this long is stuck
LIVENESS_TICK_S = 0.25
EXIT_SERVING_FAILED = 1  # exit status when a serving task kept failing: systemd (Restart=on-failure) restarts us


class Daemon:
    def __init__(self, cfg: ServeConfig, model_dir: str, *, notifier: Notifier | None = None,
                 placement_factory: PlacementFactory | None = None, loop_stale_s: float = LOOP_STALE_S):
        self.cfg = cfg
        self.model_dir = model_dir
        self.notifier = notifier or Notifier(env={})
        self.daemon_id = secrets.token_hex(8)
        self.metrics = Metrics(cfg.served_name)
        self.tokenizer: TextTokenizer | None = None
        self.clients: dict[bytes, ClientState] = {}  # ZMQ peers by routing id
        self.local_clients: dict[bytes, ClientState] = {}  # in-process front ends (HTTP)
        self.by_engine_id: dict[str, GenerateRequest] = {}
        self.endpoints: list[str] = []
        self.metrics_port = 0
        self.draining = False
        self.started_at = time.monotonic()
        self.last_stats: ep.EngineStats | None = None
        self.last_stats_at: float | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._ids = itertools.count(1)
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._raw_router: zmq.Socket | None = None
        self._monitor_sock: zmq.asyncio.Socket | None = None
        self._auth = None
        self.allow_list = None
        self._tasks: list[asyncio.Task] = []
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self.outboxes = Outboxes(cfg.client_queue_limit, self.metrics, self.clients, self._drop_client)
        self._send = self.outboxes.send
        self.admission: Admission | None = None
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task | None = None
        self._drain_now = asyncio.Event()
        self._notified_ready = False
        self._last_watchdog = 0.0
        self.exit_code = 0  # what `moed serve` exits with once stopped
        self.loop_stale_s = loop_stale_s
        failures = Counter("moed_serving_task_failures_total", "Serving tasks that failed and were restarted (a "
                           "daemon bug: the log has the traceback)", ["task"], registry=self.metrics.registry)
        self.liveness = Liveness(on_fatal=self._on_fatal, on_failure=lambda task: failures.labels(task).inc())
        self.frontend_loop = self.liveness.register("frontend", loop_stale_s, probe=self._probe_frontend)
        self._probe_sock: zmq.asyncio.Socket | None = None
        self._probe_client: ClientState | None = None
        self._probe_ids = itertools.count(1)
        self._lag = Gauge("moed_event_loop_lag_seconds", "How late the daemon's event loop ran its last liveness "
                          "tick (a blocked loop delays every client)", registry=self.metrics.registry)
        self._metrics_server: MetricsServer | None = None
        self.http: OpenAIServer | None = None  # the OpenAI-compatible API (http_address)
        self.http_port = 0
        self.supervisor: WorkerSupervisor | None = None
        self.placement = PlacementChannel(self._send_to_engine)
        if placement_factory is None and cfg.placement != "off" and (cfg.placement == "on" or cfg.moe == "offload"):
            placement_factory = self._default_placement
        self._placement_factory = placement_factory
        self.placement_manager: PlacementManager | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer, bind sockets and the metrics port, start the worker. Raises on bad setup."""
        memory.limit_heap_growth()
        self.tokenizer = TextTokenizer(self.model_dir)
        self.admission = Admission(self.cfg, self.tokenizer, self.metrics, refusal=self._refusal,
                                   engine_info=lambda: self.supervisor.info if self.supervisor else None,
                                   start=self._start, send=self._send, in_flight_changed=self._update_in_flight,
                                   checkpoint_max_len=self._checkpoint_max_len())
        self._ctx = zmq.asyncio.Context()
        router = self._router = self.outboxes.router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # full or gone peers raise instead of dropping silently
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.SNDHWM, self.cfg.client_send_hwm)
        # Beyond this the peer is cut off without a reply; below it, a message over the limit gets an Error.
        router.setsockopt(zmq.MAXMSGSIZE, max(4 * self.admission.max_message_bytes, CUTOFF_MIN_BYTES))
        router.setsockopt(zmq.HEARTBEAT_IVL, 5000)  # ZMTP pings find peers that vanished without a FIN
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        if self.cfg.curve_secret_key:
            from moed.daemon.auth import enable_curve

            self._auth, self.allow_list = enable_curve(self._ctx, router, self.cfg.curve_secret_key,
                                                       self.cfg.curve_allowed_clients)
        for endpoint in self.cfg.listen:
            if endpoint.startswith("ipc://"):
                Path(endpoint[6:]).parent.mkdir(parents=True, exist_ok=True)
            try:
                router.bind(endpoint)
            except zmq.ZMQError as e:
                raise OSError(f"cannot listen on {endpoint}: {e}") from e
            self.endpoints.append(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        self._raw_router = zmq.Socket.shadow(router.underlying)
        # The liveness probe: an in-process client (inproc skips Curve) with an unguessable routing id.
        probe_endpoint = f"inproc://moed-liveness-{self.daemon_id}"
        router.bind(probe_endpoint)
        probe = self._probe_sock = self._ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.setsockopt(zmq.ROUTING_ID, b"moed-liveness-" + secrets.token_bytes(16))
        probe.connect(probe_endpoint)
        self._probe_client = ClientState(probe.getsockopt(zmq.ROUTING_ID), time.monotonic(), 1)
        monitor = self._monitor_sock = router.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if self.cfg.metrics_address:
            self._metrics_server = MetricsServer(self.metrics, self.readiness, self.health)
            await self._metrics_server.start(self.cfg.metrics_address)
            self.metrics_port = self._metrics_server.port
        if self.cfg.http_address:
            from moed.daemon.openai_api import OpenAIServer

            self.http = OpenAIServer(self)
            await self.http.start(self.cfg.http_address)
            self.http_port = self.http.port
        self.supervisor = WorkerSupervisor(
            self.cfg, self.model_dir, self._ctx, on_message=self._on_engine_message, on_ready=self._on_engine_ready,
            on_lost=self._on_engine_lost, on_state=self._on_engine_state, on_restart=self.metrics.worker_restarts.inc,
            liveness=self.liveness)
        self.supervisor.start()
        spawn = self.liveness.spawn
        wd = self.notifier.watchdog_interval_s
        tick = min(LIVENESS_TICK_S, wd / 2) if wd else LIVENESS_TICK_S
        self._tasks += [spawn("frontend", self._frontend), spawn("monitor", lambda: self._monitor(monitor)),
                        spawn("housekeeping", self._housekeeping), spawn("flush", self.outboxes.run),
                        spawn("liveness", lambda: self.liveness.run(tick, self._on_liveness_tick))]
        if self._placement_factory is not None:
            self.placement_manager = self._placement_factory(self.placement)
            if isinstance(self.placement_manager, DaemonPlacement):
                self.placement_manager.on_synced = self.metrics.observe_placement
            self._tasks.append(spawn("placement", self.placement_manager.run))
        log.info("moed daemon %s listening on %s", self.daemon_id, ", ".join(self.endpoints))

    def _checkpoint_max_len(self) -> int:
        """The checkpoint's max_position_embeddings (0 when unreadable: the worker will say why at load)."""
        try:
            return int(json.loads((Path(self.model_dir) / "config.json").read_text())["max_position_embeddings"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    @property
    def max_message_bytes(self) -> int:
        """The largest client message or HTTP body answered (max_message_bytes, or sized to max_model_len)."""
        return self.admission.max_message_bytes if self.admission is not None else self.cfg.max_message_bytes

    def _default_placement(self, channel: PlacementChannel) -> DaemonPlacement:
        config = Path(self.model_dir) / "config.json"
        try:
            num_experts = int(json.loads(config.read_text())["n_routed_experts"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OSError(f"placement: cannot read n_routed_experts from {config}: {e!r}") from e
        return DaemonPlacement(channel, num_experts, self.cfg.placement_pin_fraction, self.cfg.placement_interval_s,
                               self.cfg.placement_state_path, required=self.cfg.placement == "on")

    def request_drain(self) -> None:
        """Signal handler target: stop accepting, let in-flight requests finish, then stop. A second
        signal during the drain aborts what is left at once."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain())
        else:
            log.warning("second stop signal: aborting the requests still in flight")
            self._drain_now.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def drain(self) -> None:
        self.draining = True
        n = len(self.by_engine_id) + sum(1 for c in self._all_clients() for r in c.requests.values() if r is None)
        log.info("draining: %d request(s) in flight, up to %.0f s", n, self.cfg.drain_timeout_s)
        self.notifier.stopping(f"draining {n} request(s)")
        self.metrics.ready.set(0)
        waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._drain_now.wait())]
        await asyncio.wait(waits, timeout=self.cfg.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        leftover = list(self.by_engine_id.values())
        if leftover:
            log.warning("drain timeout: aborting %d request(s)", len(leftover))
            self._send_to_engine(ep.Abort(request_ids=[r.engine_id for r in leftover]))
            now = time.monotonic()
            for req in leftover:
                self._finish(req, "abort", now)
        await self.stop()

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        deadline = time.monotonic() + 2.0  # last replies of slow clients get a moment to leave
        while self.outboxes.backlogged and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._router is not None and self._monitor_sock is not None:
            # Stop the monitor while its PAIR socket is open: libzmq blocks sending the stop event otherwise.
            with contextlib.suppress(zmq.ZMQError):
                self._router.disable_monitor()
        if self.http is not None:
            await self.http.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._auth is not None:
            self._auth.stop()
        if self.admission is not None:
            self.admission.close()
        for handle in self._deadlines.values():
            handle.cancel()
        if self._monitor_sock is not None:
            self._monitor_sock.close(linger=0)
        if self._probe_sock is not None:
            self._probe_sock.close(linger=0)
        if self._router is not None:
            self._router.close(linger=1000)
        for endpoint in self.endpoints:
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(endpoint[6:])
        if self._ctx is not None:
            self._ctx.term()
        self.notifier.close()
        self._stopped.set()
        log.info("moed daemon stopped")

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining (shutting down)"
        if self.supervisor is None:
            return False, "starting"
        if not self.supervisor.ready:
            return False, f"{self.supervisor.state}: {self.supervisor.reason}"
        return self.health()

    def health(self) -> tuple[bool, str]:
        """Whether every serving loop makes progress (the engine may still be loading)."""
        problems = self.liveness.problems()
        return (False, "; ".join(problems)) if problems else (True, "")

    # --- liveness -------------------------------------------------------------------------------

    def _on_liveness_tick(self, now: float, live: bool) -> None:
        self._lag.set(self.liveness.lag_s)
        wd = self.notifier.watchdog_interval_s
        if live and wd is not None and now - self._last_watchdog >= wd:
            self._last_watchdog = now
            self.notifier.watchdog()

    async def _probe_frontend(self) -> None:
        """One Health request through the ROUTER and the frontend, answered through the outbox."""
        rid = f"liveness-{next(self._probe_ids)}"
        await self._probe_sock.send_multipart(cp.encode(cp.Health(id=rid)))
        while True:  # skip answers to earlier probes that timed out
            _, body = await self._probe_sock.recv_multipart()
            reply = cp.decode_reply(body)
            if getattr(reply, "id", None) == rid:
                return

    def _on_fatal(self, reason: str) -> None:
        """A serving task kept failing: drain what is in flight and exit non-zero (systemd restarts us)."""
        self.exit_code = EXIT_SERVING_FAILED
        self.notifier.status(f"failed: {reason}"[:1000])
        self.request_drain()

    # --- engine side ----------------------------------------------------------------------------

    def _send_to_engine(self, msg: ep.ToWorker) -> bool:
        return self.supervisor is not None and self.supervisor.send(msg)

    def _on_engine_state(self, state: str, reason: str) -> None:
        self.metrics.set_state(state)
        self.metrics.ready.set(1.0 if state == "ready" and not self.draining else 0.0)
        if state == "ready":
            if not self._notified_ready:
                self._notified_ready = True
                self.notifier.ready(f"ready: serving {self.cfg.served_name}")
            else:
                self.notifier.status(f"ready: serving {self.cfg.served_name}")
        elif state not in ("stopping", "stopped"):
            self.notifier.status(f"{state}: {reason}"[:1000])

    def _on_engine_ready(self, info: ep.WorkerReady) -> None:
        log.info("engine ready: %s, max_model_len %d, vocab %d", info.model, info.max_model_len, info.vocab_size)

    def _on_engine_lost(self, reason: str) -> None:
        """The worker incarnation ended: every request it held gets an error."""
        now = time.monotonic()
        lost = list(self.by_engine_id.values())
        for req in lost:
            self._fail(req, "engine_error", f"engine worker failed: {reason}", now)
        self.placement.fail_all(f"engine worker failed: {reason}")
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
        if lost:
            log.error("engine worker failed with %d request(s) in flight: %s", len(lost), reason)

    def _on_engine_message(self, msg: ep.FromWorker, generation: int) -> None:
        if isinstance(msg, ep.StepOutputs):
            self._on_step(msg, generation)
        elif isinstance(msg, ep.EngineStats):
            self.last_stats, self.last_stats_at = msg, time.monotonic()
            self.metrics.observe_engine_stats(msg, generation)
            if self.placement_manager is not None:
                self.placement_manager.on_engine_stats(msg)
        elif isinstance(msg, ep.PlacementReply):
            self.placement.on_reply(msg)

    def _on_step(self, msg: ep.StepOutputs, generation: int) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        self.metrics.step.observe(msg.step_time_s)
        tokens = 0
        stop_ids = []
        replies: dict[bytes, list[cp.Chunk | cp.Final | cp.Error]] = {}  # per client: sent every STEP_SEND_EVERY
        for out in msg.outputs:
            req = self.by_engine_id.get(out.request_id)
            if req is None or req.generation != generation:
                continue  # finished or aborted here already
            tokens += len(out.new_token_ids)
            upd = req.on_output(out, now)
            self._observe(upd)
            if upd.replies:
                items = replies.setdefault(req.client, [])
                items.extend(upd.replies)
                if len(items) >= STEP_SEND_EVERY:
                    self._send_items(req.client, items)
                    replies[req.client] = []
            if upd.abort_engine:
                stop_ids.append(req.engine_id)
            if upd.done:
                self._retire(req, upd.finish_reason or "error", now)
                if upd.finish_reason == "error":
                    self._abort_siblings(req, now)
        for identity, items in replies.items():
            self._send_items(identity, items)
        if stop_ids:
            self._send_to_engine(ep.Abort(request_ids=stop_ids, reason="stop"))
        self.generation_tokens_total += tokens
        self.metrics.generation_tokens.inc(tokens)
        self.metrics.dispatch_tokens.inc(tokens)
        self.metrics.dispatch.observe(time.perf_counter() - t0)

    def _send_items(self, identity: bytes, items: list[cp.Chunk | cp.Final | cp.Error]) -> None:
        client = self._client(identity)
        if client is not None and items:
            self._send(client, items[0] if len(items) == 1 else cp.Batch(items=items))

    def _observe(self, upd: EngineUpdate) -> None:
        if upd.ttft is not None:
            self.metrics.ttft.observe(upd.ttft)
            if upd.queue is not None:
                self.metrics.queue_time.observe(upd.queue)
                self.metrics.prefill_time.observe(upd.prefill)
        if upd.decode is not None:
            self.metrics.decode_time.observe(upd.decode)
        if upd.itl is not None:
            seconds, n = upd.itl
            self.metrics.itl.observe(seconds / n, n)

    # --- request table ------------------------------------------------------------------------

    def _retire(self, req: GenerateRequest, reason: str, now: float) -> None:
        self.by_engine_id.pop(req.engine_id, None)
        handle = self._deadlines.pop(req.engine_id, None)
        if handle is not None:
            handle.cancel()
        client = self._client(req.client)
        choices = client.requests.get(req.id) if client is not None else None
        if choices is not None and req in choices:
            choices.remove(req)
            if not choices:
                del client.requests[req.id]
        self.metrics.requests.labels(reason).inc()
        self.metrics.e2e.observe(now - req.received_at)
        self._update_in_flight()

    def _update_in_flight(self) -> None:
        n = len(self.by_engine_id)
        self.metrics.in_flight.set(n)
        pending = any(r is None for c in self._all_clients() for r in c.requests.values()) if not n else True
        if n == 0 and not pending:
            self._idle.set()
        else:
            self._idle.clear()

    def _finish(self, req: GenerateRequest, reason: str, now: float) -> None:
        """End a request from the daemon side with a Final (the caller tells the engine)."""
        final = req.finish(reason, now)
        client = self._client(req.client)
        if client is not None:
            self._send(client, final)
        self._retire(req, reason, now)

    def _fail(self, req: GenerateRequest, code: str, message: str, now: float) -> None:
        """End the whole request with one Error (its other choices are aborted)."""
        client = self._client(req.client)
        if client is not None:
            self._send(client, cp.Error(id=req.id, code=code, message=message))  # type: ignore[arg-type]
        self._retire(req, "error", now)
        self._abort_siblings(req, now)

    def _abort_siblings(self, req: GenerateRequest, now: float) -> None:
        """After an Error ended a request: drop its other choices (engine Abort, no reply)."""
        client = self._client(req.client)
        siblings = list((client.requests.get(req.id) or ()) if client is not None else ())
        if siblings:
            self._send_to_engine(ep.Abort(request_ids=[r.engine_id for r in siblings]))
            for r in siblings:
                self._retire(r, "abort", now)

    def _on_deadline(self, engine_id: str) -> None:
        self._deadlines.pop(engine_id, None)
        req = self.by_engine_id.get(engine_id)
        if req is not None:
            self._send_to_engine(ep.Abort(request_ids=[engine_id]))
            self._finish(req, "deadline", time.monotonic())

    def _abort_client_requests(self, client: ClientState, reply: bool) -> None:
        now = time.monotonic()
        reqs = [r for choices in client.requests.values() if choices is not None for r in choices]
        client.cancelled.update(k for k, r in client.requests.items() if r is None)
        if reqs:
            self._send_to_engine(ep.Abort(request_ids=[r.engine_id for r in reqs]))
        for req in reqs:
            if reply:
                self._finish(req, "abort", now)
            else:
                self._retire(req, "abort", now)

    def _drop_client(self, client: ClientState, reason: str) -> None:
        if client.gone:
            return
        log.warning("dropping client %s (%s) with %d request(s)", client.identity.hex(), reason, len(client.requests))
        self.metrics.clients_dropped.labels(reason).inc()
        client.gone = True
        self._abort_client_requests(client, reply=False)
        self.outboxes.forget(client)
        self.clients.pop(client.identity, None)
        self.metrics.clients.set(len(self.clients))

    # --- receiving from clients ---------------------------------------------------------------

    async def _frontend(self) -> None:
        router, raw = self._router, self._raw_router
        beat = self.frontend_loop.beat
        while True:
            # No message is kept in a local across the await: a huge one would stay resident until the next.
            self._on_frames(await router.recv_multipart(copy=False))
            # Drain what is already queued without a loop round-trip per message (receives only: the next
            # await re-checks the socket's events, so no wake-up is lost).
            for _ in range(256):
                try:
                    self._on_frames(raw.recv_multipart(flags=zmq.DONTWAIT, copy=False))
                except zmq.Again:  # _on_frames lets no exception out: this is the receive's
                    break
            beat()

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        try:
            self._on_message(frames)
        except Exception:  # a daemon bug in the per-message path costs this message, never the frontend
            log.exception("handling a client message failed")

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        identity = frames[0].bytes
        client = self.clients.get(identity)
        if client is None:
            if identity == self._probe_client.identity:  # the liveness probe: served alike, never counted
                client = self._probe_client
            else:
                client = self.clients[identity] = ClientState(identity, now, self.cfg.client_concurrency)
                self.metrics.clients.set(len(self.clients))
        client.last_seen = now
        try:
            if len(frames) != 3:
                raise cp.ProtocolError("malformed", f"a message is 2 frames (header, body), got {len(frames) - 1}")
            cp.check_header(frames[1].buffer)
            body = frames[2]
            limit = self.admission.max_message_bytes
            if len(body) > limit:  # named by its id when it has one, so the client can tell which request failed
                raise cp.ProtocolError("message_too_large", f"message of {len(body)} bytes exceeds the daemon's "
                                       f"max_message_bytes={limit}", None, cp.message_id(body.buffer))
            msg = cp.decode_request(body.buffer)
        except cp.ProtocolError as e:
            self.metrics.protocol_errors.labels(e.code).inc()
            self._send(client, e.to_reply())
            return
        self.submit(client, msg, now)

    def submit(self, client: ClientState, msg: cp.Request, now: float | None = None) -> None:
        """Handle one decoded message of a client; every refusal becomes an Error reply to it."""
        now = time.monotonic() if now is None else now
        try:
            self._dispatch(client, msg, now)
        except cp.ProtocolError as e:
            if e.code == "invalid_request":
                self.metrics.protocol_errors.labels(e.code).inc()
            else:
                self.metrics.rejected.labels(e.code).inc()
            self._send(client, e.to_reply())
        except Exception as e:  # a daemon bug must cost one request, not the daemon
            log.exception("handling %s failed", type(msg).__name__)
            self._send(client, cp.Error(id=getattr(msg, "id", ""), code="internal", message=f"daemon error: {e}"))

    def _dispatch(self, client: ClientState, msg: cp.Request, now: float) -> None:
        if isinstance(msg, cp.Generate):
            self.admission.admit(client, msg, now)
        elif isinstance(msg, cp.Abort):
            self._on_abort(client, msg.id)
        elif isinstance(msg, cp.Heartbeat):
            self._send(client, cp.Pong(daemon_id=self.daemon_id))
            for rid in msg.ids:
                if rid not in client.requests:
                    self._send(client, cp.Error(id=rid, code="unknown_request",
                                                message=f"the daemon holds no request {rid!r} for this client "
                                                f"(daemon {self.daemon_id}; restarted or already finished)"))
        elif isinstance(msg, cp.Health):
            self._send(client, cp.HealthStatus(id=msg.id, ok=self.health()[0], state=self.supervisor.state,
                                               uptime_s=now - self.started_at))
        elif isinstance(msg, cp.Ready):
            ok, reason = self.readiness()
            self._send(client, cp.ReadyStatus(id=msg.id, ready=ok, reason=reason))
        elif isinstance(msg, cp.Stats):
            self._send(client, self._stats(msg.id, now))
        elif isinstance(msg, cp.Models):
            self._send(client, cp.ModelList(id=msg.id, models=[self._model_info()]))
        elif isinstance(msg, cp.Placement):
            if msg.op in ("pin", "unpin"):
                for name in ("layer", "expert"):
                    if getattr(msg, name) is None:
                        raise cp.ProtocolError("invalid_request", f"placement {msg.op} needs {name}", name, msg.id)
            asyncio.get_running_loop().create_task(self._placement_request(client, msg))

    def _model_info(self) -> cp.ModelInfo:
        info = self.supervisor.info if self.supervisor else None
        return cp.ModelInfo(name=self.cfg.served_name, path=self.model_dir,
                            max_model_len=info.max_model_len if info else 0,
                            vocab_size=info.vocab_size if info else self.tokenizer.vocab_size)

    def _stats(self, rid: str, now: float) -> cp.StatsReport:
        s = self.last_stats
        ok, _ = self.readiness()
        return cp.StatsReport(
            id=rid, ready=ok, state=self.supervisor.state, requests_in_flight=len(self.by_engine_id),
            clients=len(self.clients), running=s.running if s else 0, waiting=s.waiting if s else 0,
            kv_usage=s.kv_usage if s else 0.0, prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            worker_restarts=self.supervisor.restarts,
            engine_stats_age_s=None if self.last_stats_at is None else now - self.last_stats_at,
            uptime_s=now - self.started_at)

    async def _placement_request(self, client: ClientState, msg: cp.Placement) -> None:
        try:
            if self.placement_manager is not None:
                reply = await self.placement_manager.handle(msg.op, msg.layer, msg.expert)
            else:
                reply = await self.placement.request(msg.op, msg.layer, msg.expert)
            self._send(client, cp.PlacementResult(id=msg.id, ok=reply.ok, message=reply.message, pinned=reply.pinned))
        except PlacementUnavailable as e:
            self._send(client, cp.Error(id=msg.id, code="unavailable", message=f"placement: {e}"))

    def _on_abort(self, client: ClientState, rid: str, reply: bool = True) -> None:
        if rid not in client.requests:
            return  # finished already, or never existed: abort is idempotent
        choices = client.requests[rid]
        if choices is None:
            client.cancelled.add(rid)
            return
        choices = list(choices)
        self._send_to_engine(ep.Abort(request_ids=[r.engine_id for r in choices]))
        now = time.monotonic()
        for req in choices:
            if reply:
                self._finish(req, "abort", now)
            else:
                self._retire(req, "abort", now)

    # --- admission ----------------------------------------------------------------------------

    def _refusal(self) -> str | None:
        """Why no request can be admitted now, else None."""
        if self.draining:
            return "the daemon is draining (shutting down); no new requests"
        if not self.supervisor.ready:
            return f"engine not ready ({self.supervisor.state}): {self.supervisor.reason}"
        return None

    def _start(self, client: ClientState, msg: cp.Generate, ids: list[int], thinking: bool, max_tokens: int,
               now: float) -> None:
        """Register an admitted request's n choices and hand them to the engine."""
        s = msg.sampling
        deadline_s = msg.deadline_s or self.cfg.default_deadline_s or None
        parse = msg.messages is not None and msg.parse_output
        tools = msg.tools if msg.tools and msg.tool_choice != "none" else None
        choices = []
        for index in range(msg.n):
            engine_id = f"{next(self._ids):x}"
            chat = ChatOutputParser(thinking, tools) if parse else None
            req = GenerateRequest(client.identity, msg, engine_id, ids,
                                  IncrementalDetokenizer(self.tokenizer, ids, msg.skip_special_tokens), now,
                                  now + deadline_s if deadline_s else None, self.supervisor.generation, index, chat)
            seed = None if s.seed is None else (s.seed + index) % 2**63  # distinct, reproducible choices
            # The client's own SamplingParams: stop strings are matched here, on text; max_tokens is decided
            sampling = msgspec.structs.replace(s, stop=[], seed=seed, max_tokens=max_tokens)
            if not self._send_to_engine(ep.AddRequest(request_id=engine_id, prompt_token_ids=ids, sampling=sampling)):
                if choices:
                    self._send_to_engine(ep.Abort(request_ids=[r.engine_id for r in choices]))
                    for r in choices:
                        self.by_engine_id.pop(r.engine_id, None)
                raise cp.ProtocolError("unavailable", f"engine not ready: {self.supervisor.reason}", None, msg.id)
            choices.append(req)
            self.by_engine_id[engine_id] = req
        client.requests[msg.id] = choices
        if deadline_s:
            loop = asyncio.get_running_loop()
            for req in choices:
                self._deadlines[req.engine_id] = loop.call_at(loop.time() + deadline_s - (time.monotonic() - now),
                                                              self._on_deadline, req.engine_id)
        self.prompt_tokens_total += len(ids) * msg.n
        self.metrics.prompt_tokens.inc(len(ids) * msg.n)
        self._update_in_flight()

    # --- local clients (the HTTP API) -------------------------------------------------------------

    def open_local_client(self, deliver: Callable[[cp.Reply], None], limit: int) -> ClientState:
        """A client served in this process: its replies go to `deliver`; `limit` caps its choices in flight."""
        identity = b""  # never a ZMQ routing id
        client = ClientState(identity, time.monotonic(), limit, deliver)
        self.local_clients[identity] = client
        return client

    def close_local_client(self, client: ClientState) -> None:
        self._abort_client_requests(client, reply=False)
        client.gone = True
        self.local_clients.pop(client.identity, None)

    def abort(self, client: ClientState, rid: str) -> None:
        """A local client gave up on a request (its HTTP connection closed): abort it without a reply."""
        self._on_abort(client, rid, reply=False)

    def _client(self, identity: bytes) -> ClientState | None:
        return self.clients.get(identity) or self.local_clients.get(identity)

    def _all_clients(self) -> Iterator[ClientState]:
        yield from self.clients.values()
        yield from self.local_clients.values()

    # --- background -----------------------------------------------------------------------------

    async def _monitor(self, monitor: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                # The routing table drops the peer shortly after the event: probe then, and again later.
                loop.call_later(0.02, self._probe_clients)
                loop.call_later(0.25, self._probe_clients)
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.warning("refused a client on %s: Curve authentication failed",
                            event["endpoint"].decode(errors="replace"))

    def _probe_clients(self) -> None:
        for client in list(self.clients.values()):
            if client.requests and not client.outbox:
                self._send(client, cp.Pong(daemon_id=self.daemon_id))

    async def _housekeeping(self) -> None:
        last_probe = time.monotonic()
        beat = self.liveness.register("housekeeping", self.loop_stale_s).beat
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            beat()
            now = time.monotonic()
            for client in list(self.clients.values()):
                silent = now - client.last_seen
                if client.requests and silent > self.cfg.client_timeout_s:
                    log.warning("client %s silent for %.1f s with %d request(s): aborting them",
                                client.identity.hex(), silent, len(client.requests))
                    self.metrics.clients_dropped.labels("heartbeat_timeout").inc()
                    self._abort_client_requests(client, reply=True)
                elif not client.requests and not client.outbox and silent > self.cfg.client_timeout_s:
                    del self.clients[client.identity]  # idle connections cost nothing but memory
                    self.metrics.clients.set(len(self.clients))
            if now - last_probe > PROBE_INTERVAL_S:
                last_probe = now
                self._probe_clients()
