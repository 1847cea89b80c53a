"""The daemon's client side: the ZMQ ROUTER, local clients, each client message's handling, client liveness.

A mixin of `Daemon` (daemon/server.py), which holds the request table and the engine glue: both halves
act on the same clients and requests, so they share one object instead of forwarding through another.
Every message is handled whole in the frontend loop; nothing here waits on compute.

A client loses its requests (engine Abort, no reply) when its connection drops: the socket monitor
reports a disconnect, and sending it a Pong then fails with EHOSTUNREACH; or when it sends nothing
(heartbeats included) for `client_timeout_s` while it has requests in flight. Local clients (the HTTP
API, daemon/openai_api.py) go through `submit` as decoded ZMQ messages do, and their replies are handed
to a `deliver` callback instead of the socket. Their identity is empty, which no ZMQ peer can have.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from moed.client import protocol as cp
from moed.daemon.admission import Admission
from moed.daemon.clients import ClientState, Outboxes
from moed.daemon.config import ServeConfig
from moed.daemon.liveness import Liveness, Loop
from moed.daemon.metrics import Metrics
from moed.daemon.placement import PlacementChannel, PlacementManager, PlacementUnavailable
from moed.daemon.request import GenerateRequest
from moed.daemon.supervisor import WorkerSupervisor
from moed.daemon.tokenizer import TextTokenizer
from moed.engine import protocol as ep

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.25
PROBE_INTERVAL_S = 2.0  # Pong probe of clients with requests: a gone one fails with EHOSTUNREACH
CUTOFF_MIN_BYTES = 32 << 20  # messages up to this size are answered (too large), whatever max_message_bytes is


class ClientFrontend:
    """The client-facing half of `Daemon`: the attributes below are the Daemon's, set in its __init__ and start."""

    cfg: ServeConfig
    model_dir: str
    daemon_id: str
    started_at: float
    metrics: Metrics
    tokenizer: TextTokenizer | None
    admission: Admission | None
    supervisor: WorkerSupervisor | None
    clients: dict[bytes, ClientState]  # ZMQ peers by routing id
    local_clients: dict[bytes, ClientState]  # in-process front ends (HTTP)
    outboxes: Outboxes
    _send: Callable[[ClientState, Any], None]
    endpoints: list[str]
    liveness: Liveness
    loop_stale_s: float
    frontend_loop: Loop
    by_engine_id: dict[str, GenerateRequest]
    last_stats: ep.EngineStats | None
    last_stats_at: float | None
    prompt_tokens_total: int
    generation_tokens_total: int
    placement: PlacementChannel
    placement_manager: PlacementManager | None
    _ctx: zmq.asyncio.Context | None
    _router: zmq.asyncio.Socket | None
    _raw_router: zmq.Socket | None
    _monitor_sock: zmq.asyncio.Socket | None
    _probe_sock: zmq.asyncio.Socket | None
    _probe_client: ClientState | None
    _probe_ids: itertools.count
    _auth: Any
    allow_list: Any

    # --- the ROUTER -----------------------------------------------------------------------------

    def _bind_frontend(self) -> zmq.asyncio.Socket:
        """Bind the ROUTER to the listen endpoints and the liveness probe; returns its monitor socket."""
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

            self._auth, self.allow_list = enable_curve(
                self._ctx, router, self.cfg.curve_secret_key, self.cfg.curve_allowed_clients
            )
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
        self._monitor_sock = router.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        return self._monitor_sock

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
                raise cp.ProtocolError(
                    "message_too_large",
                    f"message of {len(body)} bytes exceeds the daemon's max_message_bytes={limit}",
                    None,
                    cp.message_id(body.buffer),
                )
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
                    self._send(
                        client,
                        cp.Error(
                            id=rid,
                            code="unknown_request",
                            message=f"the daemon holds no request {rid!r} for this client "
                            f"(daemon {self.daemon_id}; restarted or already finished)",
                        ),
                    )
        elif isinstance(msg, cp.Health):
            self._send(
                client,
                cp.HealthStatus(
                    id=msg.id, ok=self.health()[0], state=self.supervisor.state, uptime_s=now - self.started_at
                ),
            )
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
        return cp.ModelInfo(
            name=self.cfg.served_name,
            path=self.model_dir,
            max_model_len=info.max_model_len if info else 0,
            vocab_size=info.vocab_size if info else self.tokenizer.vocab_size,
        )

    def _stats(self, rid: str, now: float) -> cp.StatsReport:
        s = self.last_stats
        ok, _ = self.readiness()
        return cp.StatsReport(
            id=rid,
            ready=ok,
            state=self.supervisor.state,
            requests_in_flight=len(self.by_engine_id),
            clients=len(self.clients),
            running=s.running if s else 0,
            waiting=s.waiting if s else 0,
            kv_usage=s.kv_usage if s else 0.0,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            worker_restarts=self.supervisor.restarts,
            engine_stats_age_s=None if self.last_stats_at is None else now - self.last_stats_at,
            uptime_s=now - self.started_at,
        )

    async def _placement_request(self, client: ClientState, msg: cp.Placement) -> None:
        try:
            if self.placement_manager is not None:
                reply = await self.placement_manager.handle(msg.op, msg.layer, msg.expert)
            else:
                reply = await self.placement.request(msg.op, msg.layer, msg.expert)
            self._send(client, cp.PlacementResult(id=msg.id, ok=reply.ok, message=reply.message, pinned=reply.pinned))
        except PlacementUnavailable as e:
            self._send(client, cp.Error(id=msg.id, code="unavailable", message=f"placement: {e}"))

    # --- liveness of the frontend and its clients ----------------------------------------------

    async def _probe_frontend(self) -> None:
        """One Health request through the ROUTER and the frontend, answered through the outbox."""
        rid = f"liveness-{next(self._probe_ids)}"
        await self._probe_sock.send_multipart(cp.encode(cp.Health(id=rid)))
        while True:  # skip answers to earlier probes that timed out
            _, body = await self._probe_sock.recv_multipart()
            reply = cp.decode_reply(body)
            if getattr(reply, "id", None) == rid:
                return

    async def _monitor(self, monitor: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                # The routing table drops the peer shortly after the event: probe then, and again later.
                loop.call_later(0.02, self._probe_clients)
                loop.call_later(0.25, self._probe_clients)
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.warning(
                    "refused a client on %s: Curve authentication failed", event["endpoint"].decode(errors="replace")
                )

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
                    log.warning(
                        "client %s silent for %.1f s with %d request(s): aborting them",
                        client.identity.hex(),
                        silent,
                        len(client.requests),
                    )
                    self.metrics.clients_dropped.labels("heartbeat_timeout").inc()
                    self._abort_client_requests(client, reply=True)
                elif not client.requests and not client.outbox and silent > self.cfg.client_timeout_s:
                    del self.clients[client.identity]  # idle connections cost nothing but memory
                    self.metrics.clients.set(len(self.clients))
            if now - last_probe > PROBE_INTERVAL_S:
                last_probe = now
                self._probe_clients()

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
