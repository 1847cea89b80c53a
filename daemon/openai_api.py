"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, served from the daemon's own event loop.

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or whole), GET
/v1/models and /v1/models/{name}; GET /health, /ready, /metrics and /version as vLLM serves them beside the
API. A request body (daemon/openai_requests.py) becomes protocol Generates handed to the daemon as one
local client's messages (`Daemon.submit`): admission, limits, the request table, detokenisation, stop
strings and GLM-5.1's reasoning and tool-call parsing are the ZMQ path's. Replies come back through
`deliver` and are assembled into the response (daemon/openai_responses.py).

The server is the "http" loop of the daemon's liveness registry (daemon/liveness.py): every request it
answers beats, and a probe sends GET /health to its own port every third of `loop_stale_s`, so a server
that stopped accepting or answering stops the systemd watchdog and fails /health and /ready.

Errors have the status codes OpenAI's SDK maps to its exception types: 400 invalid request, 401 bad or
missing API key (when `http_api_key` is set), 404 unknown model or path, 413 body over
`max_message_bytes`, 429 over `http_max_requests` choices in flight, 503 engine not ready or draining, 500
engine or daemon failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from moed.client import protocol as cp
from moed.daemon.config import ServeConfig
from moed.daemon.liveness import Liveness, Loop
from moed.daemon.metrics import Metrics
from moed.daemon.openai_requests import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    decode_body,
    error_from_reply,
    generation_defaults,
    to_generates,
    unknown_model,
)
from moed.daemon.openai_responses import Completion, Pending, SseResponse, TokenPieces, json_encoder

log = logging.getLogger(__name__)

PROBE_REQUEST = b"GET /health HTTP/1.1\r\nhost: moed-liveness\r\nconnection: close\r\n\r\n"


class DaemonCore(Protocol):
    """What the HTTP front end uses of moed.daemon.server.Daemon (named here: the server imports this module)."""

    cfg: ServeConfig
    model_dir: str
    tokenizer: Any
    metrics: Metrics
    supervisor: Any
    max_message_bytes: int
    liveness: Liveness
    loop_stale_s: float

    def readiness(self) -> tuple[bool, str]: ...
    def health(self) -> tuple[bool, str]: ...
    def open_local_client(self, deliver: Callable[[cp.Reply], None], limit: int) -> Any: ...
    def close_local_client(self, client: Any) -> None: ...
    def submit(self, client: Any, msg: cp.Request) -> None: ...
    def abort(self, client: Any, rid: str) -> None: ...


# --- the API ---------------------------------------------------------------------------------------


class OpenAIServer:
    """The HTTP front end: one local client of the daemon for all HTTP requests."""

    def __init__(self, daemon: DaemonCore):
        self.daemon = daemon
        self.cfg = daemon.cfg
        self.pending: dict[str, Pending] = {}
        self.client: Any = None  # the daemon's ClientState for all HTTP requests
        self.pieces: TokenPieces | None = None
        self.defaults = generation_defaults(Path(daemon.model_dir))
        self.created = int(time.time())
        self.port = 0
        self.live: Loop | None = None  # this server in the daemon's liveness registry
        self._probe_host = ""
        self._server: Any = None
        self._main_loop: asyncio.Task | None = None
        self.app = self._build_app()

    # --- lifecycle ---

    async def start(self, address: str) -> None:
        import uvicorn

        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen(2048)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on http_address {address}: {e}") from e
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.client = self.daemon.open_local_client(self._deliver, self.cfg.http_max_requests)
        self.pieces = TokenPieces(self.daemon.tokenizer)
        self.live = self.daemon.liveness.register("http", self.daemon.loop_stale_s, probe=self._probe)
        # The probe connects where clients do; a wildcard address is reached through loopback.
        self._probe_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        config = uvicorn.Config(
            _counted(self.app, self.daemon.metrics.http_requests, self.live.beat),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=30,
            limit_concurrency=2 * self.cfg.http_max_requests + 64,
            timeout_graceful_shutdown=2,
        )
        config.load()
        server = self._server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        # uvicorn's tick (date header, exit flag); Server.serve would also take over SIGINT/SIGTERM, the daemon's
        self._main_loop = asyncio.get_running_loop().create_task(server.main_loop(), name="moed-http")
        log.info("OpenAI-compatible API on http://%s:%d/v1", host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.should_exit = True
        if self.live is not None:
            self.daemon.liveness.unregister(self.live)
        if self._main_loop is not None:
            with contextlib.suppress(Exception):
                await self._main_loop
        with contextlib.suppress(Exception):
            await server.shutdown()
        if self.client is not None:
            self.daemon.close_local_client(self.client)

    async def _probe(self) -> None:
        """GET /health through this server's own socket: any HTTP answer shows it accepts and answers (its body
        may say another loop is stuck)."""
        reader, writer = await asyncio.open_connection(self._probe_host, self.port)
        try:
            writer.write(PROBE_REQUEST)
            status = await reader.readline()
            if not status.startswith(b"HTTP/1.1 "):
                raise ConnectionError(f"the HTTP API answered GET /health with {status[:80]!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # --- daemon side ---

    def _deliver(self, reply: cp.Reply) -> None:
        """The daemon's replies to HTTP requests; never raises into the daemon."""
        try:
            for item in reply.items if isinstance(reply, cp.Batch) else (reply,):
                pending = self.pending.get(getattr(item, "id", ""))
                if pending is not None:
                    pending.push(item)  # type: ignore[arg-type]
        except Exception:
            log.exception("HTTP API: delivering a reply failed")

    def _submit(self, gen: cp.Generate) -> None:
        self.daemon.submit(self.client, gen)

    def abort(self, pending: Pending) -> None:
        """Forget a request's replies and abort what the daemon still runs of it."""
        for rid in pending.ids:
            self.pending.pop(rid, None)
            with contextlib.suppress(Exception):
                self.daemon.abort(self.client, rid)

    # --- app ---

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="moed", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_: Request, e: ApiError) -> Response:
            headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
            if e.status in (429, 503):
                headers = {"retry-after": "1"}
            return JSONResponse(e.body(), status_code=e.status, headers=headers)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, e: HTTPException) -> Response:
            message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
            return JSONResponse(
                ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).body(),
                status_code=e.status_code,
            )

        @app.exception_handler(Exception)
        async def internal_error(_: Request, e: Exception) -> Response:
            log.exception("HTTP API: request failed")
            return JSONResponse(
                ApiError(500, f"daemon error: {type(e).__name__}: {e}", code="internal").body(), status_code=500
            )

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            self._authorize(request)
            body = await decode_body(request, ChatRequest, self.daemon.max_message_bytes)
            return await self._generate(request, body, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            self._authorize(request)
            body = await decode_body(request, CompletionRequest, self.daemon.max_message_bytes)
            return await self._generate(request, body, chat=False)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            self._authorize(request)
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        @app.get("/v1/models/{name:path}")
        async def model(request: Request, name: str) -> Response:
            self._authorize(request)
            if name != self.cfg.served_name:
                raise unknown_model(name, self.cfg.served_name)
            return JSONResponse(self._model_card())

        @app.get("/health")
        async def health() -> Response:
            ok, reason = self.daemon.health()
            return Response(
                b"ok\n" if ok else f"not live: {reason}\n".encode(),
                media_type="text/plain",
                status_code=200 if ok else 503,
            )

        @app.get("/ready")
        async def ready() -> Response:
            ok, reason = self.daemon.readiness()
            return Response(
                b"ready\n" if ok else f"not ready: {reason}\n".encode(),
                media_type="text/plain",
                status_code=200 if ok else 503,
            )

        @app.get("/metrics")
        async def metrics() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(self.daemon.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/version")
        async def version() -> Response:
            return JSONResponse({"version": self.daemon.metrics.version})

        return app

    def _authorize(self, request: Request) -> None:
        key = self.cfg.http_api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' (the daemon's http_api_key)",
                code="invalid_api_key",
            )

    def _model_card(self) -> dict[str, Any]:
        info = self.daemon.supervisor.info if self.daemon.supervisor else None
        return {
            "id": self.cfg.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "moed",
            "root": self.daemon.model_dir,
            "parent": None,
            "max_model_len": info.max_model_len if info else None,
        }

    # --- generate ---

    async def _generate(self, request: Request, body: ChatRequest | CompletionRequest, chat: bool) -> Any:
        gens = to_generates(body, chat, self.cfg.served_name, self.defaults)
        pending = Pending([g.id for g in gens], sum(g.n for g in gens))
        for g in gens:
            self.pending[g.id] = pending
        try:
            for g in gens:
                self._submit(g)
            first = await self._admitted(pending)
        except BaseException:
            self.abort(pending)
            raise
        if isinstance(first, cp.Error):
            self.abort(pending)
            raise error_from_reply(first)
        view = Completion(self, body, chat, gens, pending)
        if body.stream:
            return SseResponse(self, view, pending)
        return await self._whole(request, view, pending)

    async def _admitted(self, pending: Pending) -> cp.Chunk | cp.Final | cp.Error | None:
        """Wait until every prompt is admitted (or one was refused: that Error). A request still being tokenised
        (a long prompt) is admitted when its first reply arrives."""
        client = self.client
        while True:
            for item in pending.replies:
                if isinstance(item, cp.Error):
                    return item
            if all(isinstance(client.requests.get(rid), list) for rid in pending.ids) or pending.replies:
                return None
            pending.event.clear()
            await pending.event.wait()

    async def _whole(self, request: Request, view: Completion, pending: Pending) -> Any:
        watcher = pending.watch(request.receive)
        done = False
        try:
            while pending.finals < pending.choices and not pending.gone:
                for item in await pending.take():
                    if isinstance(item, cp.Error):
                        raise error_from_reply(item)
                    view.add(item)
            done = not pending.gone
        finally:
            watcher.cancel()
            if done:
                for rid in pending.ids:
                    self.pending.pop(rid, None)
            else:
                self.abort(pending)
        return Response(json_encoder.encode(view.whole()), media_type="application/json")


ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics", "/version"}
)


def _counted(app: Callable, counter: Any, beat: Callable[[], None]) -> Callable:
    """The app, counting answered requests by route (known ones; "other" keeps the label set small) and status;
    `beat` tells the liveness registry the server answered one."""

    async def counted(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
        try:
            await app(scope, receive, send_status)
        finally:
            counter.labels(route, str(status)).inc()
            beat()

    return counted
