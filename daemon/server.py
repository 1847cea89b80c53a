"""The daemon: the request table and the glue to the engine worker, behind the clients' frontend.

Everything runs in one asyncio loop and nothing in it waits on compute: admission (daemon/admission.py)
tokenises long prompts in a thread, the engine is another process. Clients reach the daemon through the
ZMQ ROUTER or in process (the HTTP API), both handled by the frontend (daemon/frontend.py, a mixin of
`Daemon`). Replies leave through per-client outboxes (daemon/clients.py), so nothing a slow or broken
client does can delay replies to others. Every serving task runs under the liveness registry's guard
(daemon/liveness.py), and the watchdog, /ready and /health believe only the loops' progress: the
frontend's is proven by a Health message that an in-process socket sends through the ROUTER every third
of `loop_stale_s`.

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
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge

from moed.client import protocol as cp
from moed.daemon import memory
from moed.daemon.admission import Admission
from moed.daemon.clients import ClientState, Outboxes
from moed.daemon.config import ServeConfig
from moed.daemon.detokenizer import IncrementalDetokenizer
from moed.daemon.frontend import ClientFrontend
from moed.daemon.glm_chat import ChatOutputParser
from moed.daemon.liveness import Liveness
from moed.daemon.metrics import Metrics, MetricsServer
from moed.daemon.placement import DaemonPlacement, PlacementChannel, PlacementFactory, PlacementManager
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
LOOP_STALE_S = 5.0  # a serving loop without progress (or an unanswered probe) this long is stuck
LIVENESS_TICK_S = 0.25
EXIT_SERVING_FAILED = 1  # exit status when a serving task kept failing: systemd (Restart=on-failure) restarts us


class Daemon(ClientFrontend):
    def __init__(
        self,
        cfg: ServeConfig,
        model_dir: str,
        *,
        notifier: Notifier | None = None,
        placement_factory: PlacementFactory | None = None,
        loop_stale_s: float = LOOP_STALE_S,
    ):
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
        failures = Counter(
            "moed_serving_task_failures_total",
            "Serving tasks that failed and were restarted (a daemon bug: the log has the traceback)",
            ["task"],
            registry=self.metrics.registry,
        )
        self.liveness = Liveness(on_fatal=self._on_fatal, on_failure=lambda task: failures.labels(task).inc())
        self.frontend_loop = self.liveness.register("frontend", loop_stale_s, probe=self._probe_frontend)
        self._probe_sock: zmq.asyncio.Socket | None = None
        self._probe_client: ClientState | None = None
        self._probe_ids = itertools.count(1)
        self._lag = Gauge(
            "moed_event_loop_lag_seconds",
            "How late the daemon's event loop ran its last liveness tick (a blocked loop delays every client)",
            registry=self.metrics.registry,
        )
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
        self.admission = Admission(
            self.cfg,
            self.tokenizer,
            self.metrics,
            refusal=self._refusal,
            engine_info=lambda: self.supervisor.info if self.supervisor else None,
            start=self._start,
            send=self._send,
            in_flight_changed=self._update_in_flight,
            checkpoint_max_len=self._checkpoint_max_len(),
        )
        self._ctx = zmq.asyncio.Context()
        monitor = self._bind_frontend()
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
            self.cfg,
            self.model_dir,
            self._ctx,
            on_message=self._on_engine_message,
            on_ready=self._on_engine_ready,
            on_lost=self._on_engine_lost,
            on_state=self._on_engine_state,
            on_restart=self.metrics.worker_restarts.inc,
            liveness=self.liveness,
        )
        self.supervisor.start()
        spawn = self.liveness.spawn
        wd = self.notifier.watchdog_interval_s
        tick = min(LIVENESS_TICK_S, wd / 2) if wd else LIVENESS_TICK_S
        self._tasks += [
            spawn("frontend", self._frontend),
            spawn("monitor", lambda: self._monitor(monitor)),
            spawn("housekeeping", self._housekeeping),
            spawn("flush", self.outboxes.run),
            spawn("liveness", lambda: self.liveness.run(tick, self._on_liveness_tick)),
        ]
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
        return DaemonPlacement(
            channel,
            num_experts,
            self.cfg.placement_pin_fraction,
            self.cfg.placement_interval_s,
            self.cfg.placement_state_path,
            required=self.cfg.placement == "on",
        )

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

    def _start(
        self, client: ClientState, msg: cp.Generate, ids: list[int], thinking: bool, max_tokens: int, now: float
    ) -> None:
        """Register an admitted request's n choices and hand them to the engine."""
        s = msg.sampling
        deadline_s = msg.deadline_s or self.cfg.default_deadline_s or None
        parse = msg.messages is not None and msg.parse_output
        tools = msg.tools if msg.tools and msg.tool_choice != "none" else None
        choices = []
        for index in range(msg.n):
            engine_id = f"{next(self._ids):x}"
            chat = ChatOutputParser(thinking, tools) if parse else None
            req = GenerateRequest(
                client.identity,
                msg,
                engine_id,
                ids,
                IncrementalDetokenizer(self.tokenizer, ids, msg.skip_special_tokens),
                now,
                now + deadline_s if deadline_s else None,
                self.supervisor.generation,
                index,
                chat,
            )
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
                self._deadlines[req.engine_id] = loop.call_at(
                    loop.time() + deadline_s - (time.monotonic() - now), self._on_deadline, req.engine_id
                )
        self.prompt_tokens_total += len(ids) * msg.n
        self.metrics.prompt_tokens.inc(len(ids) * msg.n)
        self._update_in_flight()
