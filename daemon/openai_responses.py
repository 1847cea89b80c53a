"""OpenAI responses: a request's replies from the daemon, queued, and assembled whole or as server-sent events.

Replies wait per request in a small queue (`Pending`) where a choice's consecutive chunks merge, so a
client that reads slowly costs its own text, never the daemon's time; sending is awaited by the request's
own task, and a closed connection (seen by a task waiting on the ASGI receive channel) aborts the request.
An error after a stream has started is sent as an `error` event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any, Protocol

import msgspec
from fastapi.responses import Response

from moed.client import protocol as cp
from moed.daemon.clients import merge_chunks
from moed.daemon.config import ServeConfig
from moed.daemon.openai_requests import ChatRequest, CompletionRequest, error_from_reply

log = logging.getLogger(__name__)

json_encoder = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


class HttpServer(Protocol):
    """What a response uses of moed.daemon.openai_api.OpenAIServer (named here: that module imports this one)."""

    cfg: ServeConfig
    daemon: Any
    pieces: TokenPieces | None
    pending: dict[str, Pending]

    def abort(self, pending: Pending) -> None: ...


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


class Completion:
    """One HTTP request's response: its choices accumulated (whole) or turned into SSE events (streamed)."""

    def __init__(
        self,
        server: HttpServer,
        body: ChatRequest | CompletionRequest,
        chat: bool,
        gens: list[cp.Generate],
        pending: Pending,
    ):
        self.server, self.body, self.chat, self.pending = server, body, chat, pending
        self.id = gens[0].id if len(gens) == 1 else gens[0].id.rsplit("-", 1)[0]
        self.model = server.cfg.served_name
        self.created = int(time.time())
        self.n = gens[0].n
        self.base = {gen.id: i * self.n for i, gen in enumerate(gens)}  # request id -> its first choice index
        tok = server.daemon.tokenizer
        self.echo = (
            [g.prompt if g.prompt is not None else tok.decode(g.prompt_token_ids) for g in gens]
            if not chat and body.echo
            else None
        )
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
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

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
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": content,
                    "reasoning_content": reasoning or None,
                }
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
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    @property
    def _logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def _call(self, d: cp.ToolCallDelta, first: bool) -> dict[str, Any]:
        if first:
            return {
                "index": d.index,
                "id": d.id,
                "type": "function",
                "function": {"name": d.name, "arguments": d.arguments},
            }
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

    def _chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None, with_usage: bool = False
    ) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": f"{self.object}.chunk" if self.chat else self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.usage_in_chunks or with_usage:
            obj["usage"] = usage
        return b"data: " + json_encoder.encode(obj) + b"\n\n"

    def opening(self) -> bytes:
        if not self.chat:
            return b""
        return b"".join(
            self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(len(self.choices))
        )

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


class SseResponse(Response):
    """A streamed completion as server-sent events; a closed connection aborts the request."""

    def __init__(self, server: HttpServer, view: Completion, pending: Pending):  # no body: no super().__init__
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
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await send_body(view.opening())
            while pending.finals < pending.choices:
                out = []
                items = await pending.take()
                if pending.gone:
                    return  # aborted below; nothing more can be sent
                for item in items:
                    if isinstance(item, cp.Error):
                        err = error_from_reply(item)
                        out.append(b"data: " + json_encoder.encode(err.body()) + b"\n\n")
                        pending.finals = pending.choices  # an Error ends the request
                        break
                    out.append(view.event(item))
                await send_body(b"".join(out))
            done = True
            watcher.cancel()  # before the last send: a finished response reads as a disconnect
            await send_body(view.closing(), more=False)
        except TimeoutError:
            log.warning(
                "HTTP API: a client read nothing for %.0f s (client_timeout_s); its request %s is dropped",
                limit,
                pending.ids[0],
            )
        except OSError:
            if not pending.gone:
                raise
        finally:
            watcher.cancel()
            if done:
                for rid in pending.ids:
                    self.server.pending.pop(rid, None)
            else:
                self.server.abort(pending)
