"""Admission of generate requests: from a decoded Generate to prompt token ids the engine can take.

Refusals are raised as `ProtocolError`s naming the field. Checks that cost nothing come first
(draining, engine state, duplicate ids, the client's choices in flight, the model name); then the
prompt is tokenised (chat rendered with its tools and template arguments), on the loop when short and
in a thread when long; then the ids are checked against the vocabulary and `max_model_len`, which
also decides max_tokens when the request leaves it out (the rest of the context). An admitted request
goes to `start`, which registers its n choices with the engine; a request being tokenised sits in
`client.requests` as None, so aborts and disconnects during tokenising are seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from moed.client import protocol as cp
from moed.daemon.clients import ClientState
from moed.daemon.config import ServeConfig
from moed.daemon.glm_chat import ChatInputError, prompt_opens_reasoning, template_messages, text_content
from moed.daemon.metrics import Metrics
from moed.daemon.tokenizer import TemplateError, TextTokenizer
from moed.engine import protocol as ep

THREAD_TOKENIZE_CHARS = 32768  # prompts longer than this are tokenised off the loop
_encoder = msgspec.msgpack.Encoder()

# start(client, msg, ids, thinking, max_tokens, received_at): `thinking` when the prompt leaves the model inside
# <think>; `max_tokens` decided (the request's, else the rest of the context).
Start = Callable[[ClientState, cp.Generate, list[int], bool, int, float], None]


class Admission:
    def __init__(self, cfg: ServeConfig, tokenizer: TextTokenizer, metrics: Metrics, *,
                 refusal: Callable[[], str | None],
                 engine_info: Callable[[], ep.WorkerReady | None],
                 start: Start,
                 send: Callable[[ClientState, cp.Reply], None],
                 in_flight_changed: Callable[[], None]):
        """`refusal()`: why no request can be admitted now (draining, engine not ready), else None.
        `start` registers an admitted request (see `Start`); it may raise ProtocolError."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._refusal = refusal
        self._engine_info = engine_info
        self._start = start
        self._send = send
        self._in_flight_changed = in_flight_changed

    def admit(self, client: ClientState, msg: cp.Generate, now: float) -> None:
        """Start `msg` now, or start tokenising it off the loop; raises ProtocolError on a refusal."""
        def refuse(code: str, message: str) -> None:
            raise cp.ProtocolError(code, message, None, msg.id)

        refusal = self._refusal()
        if refusal is not None:
            refuse("unavailable", refusal)
        if msg.id in client.requests:
            refuse("duplicate_id", f"request id {msg.id!r} is already in flight for this client")
        held = sum(1 if c is None else len(c) for c in client.requests.values())
        if held + msg.n > client.limit:
            what = "the HTTP API has" if client.deliver is not None else "this client already has"
            key = "http_max_requests" if client.deliver is not None else "client_concurrency"
            refuse("too_many_requests", f"{what} {held} requests (choices) in flight and this one asks for {msg.n} "
                   f"more ({key}={client.limit})")
        if msg.model is not None and msg.model != self.cfg.served_name:
            raise cp.ProtocolError("invalid_request", f"model {msg.model!r} is not served here; this daemon serves "
                                   f"{self.cfg.served_name!r}", "model", msg.id)
        size = len(msg.prompt or "") + sum(len(text_content(m.content)) for m in msg.messages or ())
        if msg.tools or msg.chat_template_kwargs:  # rendered by the template too (tools as JSON)
            size += len(_encoder.encode(msg.tools)) + len(_encoder.encode(msg.chat_template_kwargs))
        if size > THREAD_TOKENIZE_CHARS:
            client.requests[msg.id] = None
            self._in_flight_changed()
            asyncio.get_running_loop().create_task(self._admit_in_thread(client, msg, now))
        else:
            ids, thinking = self.tokenize(msg)
            self._start(client, msg, ids, thinking, self.check_ids(msg, ids), now)

    async def _admit_in_thread(self, client: ClientState, msg: cp.Generate, now: float) -> None:
        try:
            ids, thinking = await asyncio.to_thread(self.tokenize, msg)
        except cp.ProtocolError as e:
            ids, thinking, error = None, False, e
        if client.requests.get(msg.id, False) is None:
            del client.requests[msg.id]
        cancelled = msg.id in client.cancelled
        client.cancelled.discard(msg.id)
        try:
            if client.gone or cancelled:
                if not client.gone:
                    self._send(client, cp.Final(id=msg.id, finish_reason="abort", prompt_tokens=len(ids or ()),
                                                completion_tokens=0, e2e_s=time.monotonic() - now))
                return
            if ids is None:
                raise error
            if self._refusal() is not None:
                raise cp.ProtocolError("unavailable", "engine became unavailable while the prompt was tokenised",
                                       None, msg.id)
            self._start(client, msg, ids, thinking, self.check_ids(msg, ids), now)
        except cp.ProtocolError as e:
            self.metrics.protocol_errors.labels(e.code).inc()
            self._send(client, e.to_reply())
        finally:
            self._in_flight_changed()

    def tokenize(self, msg: cp.Generate) -> tuple[list[int], bool]:
        """The prompt's ids, and whether it leaves the model inside <think> (chat with thinking on)."""
        tok = self.tokenizer
        thinking = False
        if msg.prompt is not None:
            ids = tok.encode(msg.prompt, add_special_tokens=True)
            where = "prompt"
        elif msg.messages is not None:
            where = "messages"
            try:
                tools = msgspec.to_builtins(msg.tools) if msg.tools is not None else None
                prompt = tok.render_chat(template_messages(msg.messages), msg.add_generation_prompt, tools,
                                         msg.chat_template_kwargs)
            except ChatInputError as e:
                raise cp.ProtocolError("invalid_request", str(e), e.field, msg.id) from None
            except TemplateError as e:
                raise cp.ProtocolError("invalid_request", str(e), "messages", msg.id) from None
            ids = tok.encode(prompt, add_special_tokens=False)  # the template writes the special tokens
            thinking = prompt_opens_reasoning(prompt)
        else:
            ids, where = list(msg.prompt_token_ids), "prompt_token_ids"
        if not ids:
            raise cp.ProtocolError("invalid_request", f"{where} encodes to no tokens", where, msg.id)
        return ids, thinking

    def check_ids(self, msg: cp.Generate, ids: list[int]) -> int:
        """The prompt's ids against the engine's vocabulary and max_model_len; returns the max_tokens to run."""
        info = self._engine_info()
        vocab = info.vocab_size if info else self.tokenizer.vocab_size
        s = msg.sampling
        if msg.prompt_token_ids is not None:
            for i, t in enumerate(ids):
                if t >= vocab:
                    raise cp.ProtocolError("invalid_request", f"token id {t} is outside the vocabulary "
                                           f"(0..{vocab - 1})", f"prompt_token_ids[{i}]", msg.id)
        for i, t in enumerate(s.stop_token_ids):
            if t >= vocab:
                raise cp.ProtocolError("invalid_request", f"token id {t} is outside the vocabulary (0..{vocab - 1})",
                                       f"sampling.stop_token_ids[{i}]", msg.id)
        max_len = info.max_model_len if info else 0
        max_tokens = s.max_tokens if s.max_tokens is not None else max(1, max_len - len(ids))
        if max_len:
            if len(ids) >= max_len:
                raise cp.ProtocolError("invalid_request", f"the prompt has {len(ids)} tokens; the model takes at most "
                                       f"{max_len} including generated ones", "prompt", msg.id)
            if len(ids) + max_tokens > max_len:
                raise cp.ProtocolError("invalid_request", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) "
                                       f"exceeds the model's max_model_len {max_len}", "sampling.max_tokens", msg.id)
        return max_tokens
