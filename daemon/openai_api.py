"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, served from the daemon's own event loop.

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or whole), GET
/v1/models and /v1/models/{name}; GET /health, /ready, /metrics and /version as vLLM serves them beside the
API. A request is decoded with msgspec into the structs below (fields OpenAI-compatible servers do not
know are ignored, as vLLM ignores them), turned into the ZMQ protocol's Generate, and handed to the
daemon as one local client's message (`Daemon.submit`): admission, limits, the request table,
detokenisation, stop strings and GLM-5.1's reasoning and tool-call parsing are the ZMQ path's. Replies
come back through `deliver` and wait per request in a small queue where a choice's chunks merge, so a
client that reads slowly costs its own text, never the daemon's time; sending is awaited by the request's
own task. A closed connection (seen by a task waiting on the ASGI receive channel) aborts the request.

The server is the "http" loop of the daemon's liveness registry (daemon/liveness.py): every request it
answers beats, and a probe sends GET /health to its own port every third of `loop_stale_s`, so a server
that stopped accepting or answering stops the systemd watchdog and fails /health and /ready.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status codes
OpenAI's SDK maps to its exception types: 400 invalid request, 401 bad or missing API key (when
`http_api_key` is set), 404 unknown model or path, 413 body over `max_message_bytes`, 429 over
`http_max_requests` choices in flight, 503 engine not ready or draining, 500 engine or daemon failure. An
error after a stream has started is sent as an `error` event before `[DONE]`.

Request fields beyond OpenAI's that vLLM also takes: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, skip_special_tokens, chat_template_kwargs (e.g. {"enable_thinking": false}),
add_generation_prompt, return_token_ids. Sampling defaults for fields a request leaves out come from the
checkpoint's generation_config.json (as vLLM's default `--generation-config auto`), else OpenAI's;
max_tokens defaults to the rest of the model's context.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from msgspec import Struct
from starlette.exceptions import HTTPException

from moed.client import protocol as cp
from moed.daemon.clients import merge_chunks
from moed.daemon.config import ServeConfig
from moed.daemon.liveness import Liveness, Loop
from moed.daemon.metrics import Metrics

log = logging.getLogger(__name__)

BIG_BODY_BYTES = 256 << 10  # bodies larger than this are decoded in a thread (the loop keeps its time slices)
PROBE_REQUEST = b"GET /health HTTP/1.1\r\nhost: moed-liveness\r\nconnection: close\r\n\r\n"
_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


# --- request bodies -------------------------------------------------------------------------------


class ContentPart(Struct):
    type: str
    text: str | None = None


class FunctionCall(Struct):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Struct):
    function: FunctionCall
    id: str = ""
    type: str = "function"


class Message(Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class Function(Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct):
    function: Function
    type: str = "function"


class NamedToolChoice(Struct):
    function: dict[str, Any]
    type: str = "function"


class StreamOptions(Struct):
    include_usage: bool = False


class _Common(Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra parameters
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    return_token_ids: bool = False


class ChatRequest(_Common, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(_Common, kw_only=True):
    prompt: Any
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "invalid_request_error",
                             404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_STATUS = {"invalid_request": 400, "malformed": 400, "duplicate_id": 400, "message_too_large": 413,
           "too_many_requests": 429, "unavailable": 503, "engine_error": 500, "internal": 500,
           "unknown_request": 500}


def _param(field: str | None) -> str | None:
    """The OpenAI request field a protocol error's field path names."""
    if field is None:
        return None
    return field.removeprefix("sampling.").replace("prompt_token_ids", "prompt")


def error_from_reply(err: cp.Error) -> ApiError:
    return ApiError(_STATUS.get(err.code, 500), err.message, _param(err.field), err.code)


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


# --- requests in flight --------------------------------------------------------------------------


class Pending:
    """One HTTP request's replies from the daemon: a queue in which a choice's consecutive chunks merge."""

    __slots__ = ("choices", "event", "finals", "gone", "ids", "open_chunks", "replies")

    def __init__(self, ids: list[str], choices: int):
        self.ids = ids  # the daemon request ids (one per prompt)
        self.choices = choices  # Finals expected in all
        self.replies: collections.deque[cp.Chunk | cp.Final | cp.Error] = collections.deque()
        self.open_chunks: dict[tuple[str, int], cp.Chunk] = {}
        self.finals = 0
        self.gone = False  # the client closed its connection
        self.event = asyncio.Event()

    def push(self, reply: cp.Chunk | cp.Final | cp.Error) -> None:
        if isinstance(reply, cp.Chunk):
            key = (reply.id, reply.index)
            open_chunk = self.open_chunks.get(key)
            if open_chunk is not None:
                merge_chunks(open_chunk, reply)
                return
            self.open_chunks[key] = reply
        elif isinstance(reply, cp.Final):
            self.open_chunks.pop((reply.id, reply.index), None)
        self.replies.append(reply)
        self.event.set()

    async def take(self) -> list[cp.Chunk | cp.Final | cp.Error]:
        """The replies queued since the last call (waits for one; [] when the client is gone)."""
        while not self.replies:
            if self.gone:
                return []
            self.event.clear()
            await self.event.wait()
        items = list(self.replies)
        self.replies.clear()
        self.open_chunks.clear()
        return items

    def watch(self, receive: Callable[[], Awaitable[dict]]) -> asyncio.Task:
        """A task that marks the request gone when its client closes the connection (cancel it when done)."""
        async def wait_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone = True
            self.event.set()

        return asyncio.get_running_loop().create_task(wait_disconnect())


class TokenPieces:
    """A token's text and bytes for logprobs (bytes exact for byte-level BPE, as OpenAI reports them)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        raw = json.loads(tokenizer.tokenizer.to_str()).get("decoder") or {}
        self._byte_level = raw.get("type") == "ByteLevel"
        self._bytes = _byte_decoder() if self._byte_level else {}
        self.piece = lru_cache(maxsize=1 << 16)(self._piece)

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        text = self._tok.decode([token_id], skip_special_tokens=False)
        symbol = self._tok.tokenizer.id_to_token(token_id) if self._byte_level else None
        if symbol is not None and all(c in self._bytes for c in symbol):
            data = bytes(self._bytes[c] for c in symbol)
            return data.decode("utf-8", errors="replace"), list(data)
        return text, list(text.encode())


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + n."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


# --- the API ---------------------------------------------------------------------------------------


class OpenAIServer:
    """The HTTP front end: one local client of the daemon for all HTTP requests."""

    def __init__(self, daemon: DaemonCore):
        self.daemon = daemon
        self.cfg = daemon.cfg
        self.pending: dict[str, Pending] = {}
        self.client: Any = None  # the daemon's ClientState for all HTTP requests
        self.pieces: TokenPieces | None = None
        self.defaults = _generation_defaults(Path(daemon.model_dir))
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
        config = uvicorn.Config(_counted(self.app, self.daemon.metrics.http_requests, self.live.beat),
                                lifespan="off",
                                log_config=None, access_log=False, server_header=False, timeout_keep_alive=30,
                                limit_concurrency=2 * self.cfg.http_max_requests + 64, timeout_graceful_shutdown=2)
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

    def _abort(self, pending: Pending) -> None:
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
            message = (f"no route {request.method} {request.url.path}" if e.status_code in (404, 405)
                       else str(e.detail))
            return JSONResponse(ApiError(e.status_code, message, code="not_found" if e.status_code == 404
                                         else None).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def internal_error(_: Request, e: Exception) -> Response:
            log.exception("HTTP API: request failed")
            return JSONResponse(ApiError(500, f"daemon error: {type(e).__name__}: {e}", code="internal").body(),
                                status_code=500)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            self._authorize(request)
            body = await self._decode(request, ChatRequest)
            return await self._generate(request, body, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            self._authorize(request)
            body = await self._decode(request, CompletionRequest)
            return await self._generate(request, body, chat=False)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            self._authorize(request)
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        @app.get("/v1/models/{name:path}")
        async def model(request: Request, name: str) -> Response:
            self._authorize(request)
            if name != self.cfg.served_name:
                raise self._unknown_model(name)
            return JSONResponse(self._model_card())

        @app.get("/health")
        async def health() -> Response:
            ok, reason = self.daemon.health()
            return Response(b"ok\n" if ok else f"not live: {reason}\n".encode(), media_type="text/plain",
                            status_code=200 if ok else 503)

        @app.get("/ready")
        async def ready() -> Response:
            ok, reason = self.daemon.readiness()
            return Response(b"ready\n" if ok else f"not ready: {reason}\n".encode(), media_type="text/plain",
                            status_code=200 if ok else 503)

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
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the daemon's "
                           "http_api_key)", code="invalid_api_key")

    def _model_card(self) -> dict[str, Any]:
        info = self.daemon.supervisor.info if self.daemon.supervisor else None
        return {"id": self.cfg.served_name, "object": "model", "created": self.created, "owned_by": "moed",
                "root": self.daemon.model_dir, "parent": None,
                "max_model_len": info.max_model_len if info else None}

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(404, f"the model {name!r} does not exist; this server serves {self.cfg.served_name!r}",
                        "model", "model_not_found")

    async def _decode(self, request: Request, kind: type[Struct]) -> Any:
        limit = self.daemon.max_message_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes exceeds max_message_bytes={limit}", None,
                           "request_too_large")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"request body exceeds max_message_bytes={limit}", None, "request_too_large")
            parts.append(part)
        body = b"".join(parts)
        try:
            if len(body) > BIG_BODY_BYTES:
                return await asyncio.to_thread(msgspec.json.decode, body, type=kind)
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as e:
            raise ApiError(400, f"invalid request: {e}", _param(cp.error_field(e)), "invalid_request") from None
        except (msgspec.DecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not a JSON object of this request: {e}", None, "malformed") from None

    # --- generate ---

    def _generate_messages(self, body: CompletionRequest | ChatRequest, chat: bool) -> list[cp.Generate]:
        """The protocol messages for a request (one per prompt); raises ApiError naming the field."""
        if body.model is not None and body.model != self.cfg.served_name:
            raise self._unknown_model(body.model)
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = body.max_tokens
        sampling: dict[str, Any] = {
            "temperature": _pick(body.temperature, self.defaults.get("temperature"), 1.0),
            "top_p": _pick(body.top_p, self.defaults.get("top_p"), 1.0),
            "top_k": max(0, _pick(body.top_k, self.defaults.get("top_k"), 0)),
            "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
            "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
            "seed": body.seed, "stop": stop, "stop_token_ids": body.stop_token_ids or [],
            "ignore_eos": body.ignore_eos}
        base: dict[str, Any] = {"stream": True, "n": body.n, "skip_special_tokens": body.skip_special_tokens}
        if chat:
            assert isinstance(body, ChatRequest)
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else max_tokens
            if body.response_format and body.response_format.get("type", "text") != "text":
                raise ApiError(400, "response_format other than 'text' is not supported (no guided decoding)",
                               "response_format")
            if body.logprobs:
                sampling["logprobs"] = body.top_logprobs or 0
            elif body.top_logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            base["messages"] = [_message(m, i) for i, m in enumerate(body.messages)]
            base["add_generation_prompt"] = body.add_generation_prompt
            if body.tools is not None:
                base["tools"] = [msgspec.to_builtins(t) for t in body.tools]
            if body.tool_choice is not None:
                base["tool_choice"] = _tool_choice(body.tool_choice, body.tools)
            if body.chat_template_kwargs is not None:
                base["chat_template_kwargs"] = body.chat_template_kwargs
            prompts: list[dict[str, Any]] = [{}]
        else:
            assert isinstance(body, CompletionRequest)
            if body.suffix:
                raise ApiError(400, "suffix is not supported", "suffix")
            if body.best_of is not None and body.best_of != body.n:
                raise ApiError(400, "best_of other than n is not supported", "best_of")
            if body.echo and body.logprobs is not None:
                raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", "echo")
            if body.logprobs is not None:
                sampling["logprobs"] = body.logprobs
            prompts = _prompts(body.prompt)
        sampling["max_tokens"] = max_tokens
        out = []
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        for i, prompt in enumerate(prompts):
            fields = {**base, **prompt, "id": rid if len(prompts) == 1 else f"{rid}-{i}", "sampling": sampling}
            try:
                gen = msgspec.convert(fields, cp.Generate)
                cp.check_generate(gen)
            except msgspec.ValidationError as e:
                raise ApiError(400, f"invalid request: {e}", _param(cp.error_field(e)), "invalid_request") from None
            except cp.ProtocolError as e:
                raise ApiError(400, e.message, _param(e.field), e.code) from None
            out.append(gen)
        return out

    async def _generate(self, request: Request, body: ChatRequest | CompletionRequest, chat: bool) -> Any:
        gens = self._generate_messages(body, chat)
        pending = Pending([g.id for g in gens], sum(g.n for g in gens))
        for g in gens:
            self.pending[g.id] = pending
        try:
            for g in gens:
                self._submit(g)
            first = await self._admitted(pending)
        except BaseException:
            self._abort(pending)
            raise
        if isinstance(first, cp.Error):
            self._abort(pending)
            raise error_from_reply(first)
        view = _Completion(self, body, chat, gens, pending)
        if body.stream:
            return _SseResponse(self, view, pending)
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

    async def _whole(self, request: Request, view: _Completion, pending: Pending) -> Any:
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
                self._abort(pending)
        return Response(_json.encode(view.whole()), media_type="application/json")


ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics",
                    "/version"})


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


def _pick(value: Any, default: Any, fallback: Any) -> Any:
    return value if value is not None else (default if default is not None else fallback)


def _generation_defaults(model_dir: Path) -> dict[str, Any]:
    """temperature, top_p, top_k from the checkpoint's generation_config.json (absent or unreadable: none)."""
    try:
        cfg = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if isinstance(cfg.get(k), int | float)}


def _message(m: Message, i: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, list):
        for j, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content part of type {part.type!r} is not supported: GLM-5.1 reads text parts "
                               "only", f"messages[{i}].content[{j}].type")
        out["content"] = [{"type": "text", "text": part.text} for part in m.content]
    elif m.content is not None:
        out["content"] = m.content
    for key in ("name", "tool_call_id", "reasoning_content"):
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    if m.tool_calls:
        out["tool_calls"] = [{"id": tc.id, "function": {
            "name": tc.function.name,
            "arguments": tc.function.arguments if isinstance(tc.function.arguments, str)
            else json.dumps(tc.function.arguments, ensure_ascii=False)}} for tc in m.tool_calls]
    return out


def _tool_choice(choice: str | NamedToolChoice, tools: list[Tool] | None) -> str:
    """The protocol's tool_choice. A named function is accepted and, like "required", not enforced (GLM writes its
    calls as XML, which no JSON-guided decoding could force; vLLM does the same for GLM)."""
    if isinstance(choice, NamedToolChoice):
        name = choice.function.get("name")
        if not tools or name not in {t.function.name for t in tools}:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
        return "required"
    if choice not in ("none", "auto", "required"):
        raise ApiError(400, f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                       "tool_choice")
    return choice


def _prompts(prompt: Any) -> list[dict[str, Any]]:
    """A completion request's prompts: text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt and len(prompt) <= cp.MAX_CHOICES:
        out = []
        for p in prompt:
            out += _prompts(p) if isinstance(p, str | list) and not (isinstance(p, list) and p and
                                                                     isinstance(p[0], list)) else _bad_prompt()
        return out
    return _bad_prompt()


def _bad_prompt() -> list[dict[str, Any]]:
    raise ApiError(400, f"prompt must be a string, a list of token ids, or a list of up to {cp.MAX_CHOICES} of "
                   "either", "prompt")


# --- responses -------------------------------------------------------------------------------------


class _Choice:
    __slots__ = ("echoed", "finish_reason", "logprobs", "offset", "reasoning", "text", "token_ids", "tool_calls")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[cp.TokenLogprob] = []
        self.tool_calls: dict[int, cp.ToolCallDelta] = {}
        self.finish_reason: str | None = None
        self.echoed = False  # streamed: the prompt went out (echo)
        self.offset = 0  # streamed: text_offset of the next token (completions logprobs)


class _Completion:
    """One HTTP request's response: its choices accumulated (whole) or turned into SSE events (streamed)."""

    def __init__(self, server: OpenAIServer, body: ChatRequest | CompletionRequest, chat: bool,
                 gens: list[cp.Generate], pending: Pending):
        self.server, self.body, self.chat, self.pending = server, body, chat, pending
        self.id = gens[0].id if len(gens) == 1 else gens[0].id.rsplit("-", 1)[0]
        self.model = server.cfg.served_name
        self.created = int(time.time())
        self.n = gens[0].n
        self.base = {gen.id: i * self.n for i, gen in enumerate(gens)}  # request id -> its first choice index
        tok = server.daemon.tokenizer
        self.echo = ([g.prompt if g.prompt is not None else tok.decode(g.prompt_token_ids) for g in gens]
                     if not chat and body.echo else None)
        self.choices = [_Choice() for _ in range(pending.choices)]
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.object = "chat.completion" if chat else "text_completion"
        self.usage_in_chunks = bool(body.stream_options and body.stream_options.include_usage)

    def _index(self, reply: cp.Chunk | cp.Final) -> int:
        return self.base.get(reply.id, 0) + reply.index

    def add(self, reply: cp.Chunk | cp.Final) -> None:
        choice = self.choices[self._index(reply)]
        choice.text.append(reply.text)
        choice.reasoning.append(reply.reasoning)
        choice.token_ids.extend(reply.token_ids)
        choice.logprobs.extend(reply.logprobs or ())
        for d in reply.tool_calls or ():
            call = choice.tool_calls.setdefault(d.index, cp.ToolCallDelta(index=d.index))
            call.id, call.name = call.id or d.id, call.name or d.name
            call.arguments += d.arguments
        if isinstance(reply, cp.Final):
            self._count(reply)
            choice.finish_reason = reply.finish_reason

    def _count(self, final: cp.Final) -> None:
        self.pending.finals += 1
        if final.index == 0:  # the prompt counts once per prompt, not per choice
            self.prompt_tokens += final.prompt_tokens
        self.completion_tokens += final.completion_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def whole(self) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            out: dict[str, Any] = {"index": i}
            if self.chat:
                calls = [self._call(c.tool_calls[k], first=True) for k in sorted(c.tool_calls)]
                reasoning = "".join(c.reasoning)
                content: str | None = text
                if (calls and not text.strip()) or (not text and reasoning):
                    content = None
                message: dict[str, Any] = {"role": "assistant", "content": content,
                                           "reasoning_content": reasoning or None}
                if calls:
                    message["tool_calls"] = calls
                out["message"] = message
                out["logprobs"] = self._chat_logprobs(c.logprobs) if self._logprobs else None
            else:
                if self.echo is not None:
                    text = self.echo[i // self.n] + text
                out["text"] = text
                out["logprobs"] = self._text_logprobs(c.logprobs, 0) if self._logprobs else None
            out["finish_reason"] = c.finish_reason
            if self.body.return_token_ids:
                out["token_ids"] = c.token_ids
            choices.append(out)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    @property
    def _logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def _call(self, d: cp.ToolCallDelta, first: bool) -> dict[str, Any]:
        if first:
            return {"index": d.index, "id": d.id, "type": "function",
                    "function": {"name": d.name, "arguments": d.arguments}}
        return {"index": d.index, "function": {"arguments": d.arguments}}

    def _chat_logprobs(self, lps: list[cp.TokenLogprob]) -> dict[str, Any]:
        piece = self.server.pieces.piece
        content = []
        for lp in lps:
            text, data = piece(lp.token_id)
            top = []
            for tid, value in lp.top:
                t, b = piece(tid)
                top.append({"token": t, "logprob": value, "bytes": b})
            content.append({"token": text, "logprob": lp.logprob, "bytes": data, "top_logprobs": top})
        return {"content": content}

    def _text_logprobs(self, lps: list[cp.TokenLogprob], offset: int) -> dict[str, Any]:
        piece = self.server.pieces.piece
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            text, _ = piece(lp.token_id)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({piece(tid)[0]: value for tid, value in lp.top} if lp.top else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # --- streamed ---

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None,
               with_usage: bool = False) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                               "created": self.created, "model": self.model, "choices": choices}
        if self.usage_in_chunks or with_usage:
            obj["usage"] = usage
        return b"data: " + _json.encode(obj) + b"\n\n"

    def opening(self) -> bytes:
        if not self.chat:
            return b""
        return b"".join(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]) for i in range(len(self.choices)))

    def event(self, reply: cp.Chunk | cp.Final) -> bytes:
        index = self._index(reply)
        final = isinstance(reply, cp.Final)
        if final:
            self._count(reply)
        want_ids = self.body.return_token_ids
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {}
            if reply.reasoning:
                delta["reasoning_content"] = reply.reasoning
            if reply.text:
                delta["content"] = reply.text
            if reply.tool_calls:
                delta["tool_calls"] = [self._call(d, d.name is not None) for d in reply.tool_calls]
            if not delta and not final and not (want_ids and reply.token_ids) and not reply.logprobs:
                return b""
            choice["delta"] = delta
            choice["logprobs"] = self._chat_logprobs(reply.logprobs) if reply.logprobs else None
        else:
            state = self.choices[index]
            text = reply.text
            if self.echo is not None and not state.echoed:
                text, state.echoed = self.echo[index // self.n] + text, True
            if not text and not final and not (want_ids and reply.token_ids) and not reply.logprobs:
                return b""
            choice["text"] = text
            if reply.logprobs:
                logprobs = self._text_logprobs(reply.logprobs, state.offset)
                state.offset += sum(len(t) for t in logprobs["tokens"])
                choice["logprobs"] = logprobs
            else:
                choice["logprobs"] = None
        choice["finish_reason"] = reply.finish_reason if final else None
        if want_ids:
            choice["token_ids"] = reply.token_ids
        return self._chunk([choice])

    def closing(self) -> bytes:
        tail = self._chunk([], self.usage(), with_usage=True) if self.usage_in_chunks else b""
        return tail + DONE


class _SseResponse(Response):
    """A streamed completion as server-sent events; a closed connection aborts the request."""

    def __init__(self, server: OpenAIServer, view: _Completion, pending: Pending):  # no body: no super().__init__
        self.server, self.view, self.pending = server, view, pending
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        pending, view = self.pending, self.view
        watcher = pending.watch(receive)
        limit = self.server.cfg.client_timeout_s
        done = False

        async def send_body(body: bytes, more: bool = True) -> None:
            # A client that stops reading holds its connection only this long (its replies merge meanwhile).
            async with asyncio.timeout(limit):
                await send({"type": "http.response.body", "body": body, "more_body": more})

        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            await send_body(view.opening())
            while pending.finals < pending.choices:
                out = []
                items = await pending.take()
                if pending.gone:
                    return  # aborted below; nothing more can be sent
                for item in items:
                    if isinstance(item, cp.Error):
                        err = error_from_reply(item)
                        out.append(b"data: " + _json.encode(err.body()) + b"\n\n")
                        pending.finals = pending.choices  # an Error ends the request
                        break
                    out.append(view.event(item))
                await send_body(b"".join(out))
            done = True
            watcher.cancel()  # before the last send: a finished response reads as a disconnect
            await send_body(view.closing(), more=False)
        except TimeoutError:
            log.warning("HTTP API: a client read nothing for %.0f s (client_timeout_s); its request %s is dropped",
                        limit, pending.ids[0])
        except OSError:
            if not pending.gone:
                raise
        finally:
            watcher.cancel()
            if done:
                for rid in pending.ids:
                    self.server.pending.pop(rid, None)
            else:
                self.server._abort(pending)
