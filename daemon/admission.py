"""Admission of generate requests: from a decoded Generate to prompt token ids the engine can take.

Refusals are raised as `ProtocolError`s naming the field, and the cheap ones come before anything
costly, so no request can make the daemon spend more than its limits allow:
  1. free checks: draining, engine state, duplicate ids, the client's choices in flight, the model name;
  2. sizes against `max_model_len`, before tokenising: token ids counted, max_tokens, chat messages
     (each renders to at least one token), and text at most `max_model_len` x the longest token's
     characters (no text longer can fit);
  3. tokenising (chat rendered with its tools and template arguments), in a thread of a small pool when
     the text is long; the tokenizer releases the GIL there (daemon/tokenizer.py), so the loop keeps
     serving. A text with more characters than `max_model_len` is first counted in windows, stopping
     once past the limit, so a huge prompt costs memory and time for `max_model_len` tokens, not for
     its whole length;
  4. the ids against the vocabulary and `max_model_len`, which also decides max_tokens when the request
     leaves it out (the rest of the context).
An admitted request goes to `start`, which registers its n choices with the engine; a request being
tokenised sits in `client.requests` as None, so aborts and disconnects during tokenising are seen.
`max_message_bytes` (auto: `message_bytes_for`) bounds what reaches step 1 at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable

import msgspec

from moed.client import protocol as cp
from moed.daemon import memory
from moed.daemon.clients import ClientState
from moed.daemon.config import ServeConfig
from moed.daemon.glm_chat import ChatInputError, prompt_opens_reasoning, template_messages, text_content
from moed.daemon.metrics import Metrics
from moed.daemon.tokenizer import TemplateError, TextTokenizer
from moed.engine import protocol as ep

log = logging.getLogger(__name__)

THREAD_TOKENIZE_CHARS = 32768  # prompts longer than this are tokenised off the loop
TOKENIZE_THREADS = 2  # long prompts tokenised at once; more wait (bounds the CPU and memory hostile prompts take)
TRIM_AFTER_CHARS = 1 << 16  # after tokenising a text this long, free heap memory goes back to the OS
# max_message_bytes = 0 (auto): room for max_model_len tokens of text at 16 bytes each (3-5 is usual; ids take
# at most 5 in msgpack), plus sampling, stop strings, tools and chat roles around them.
BYTES_PER_TOKEN = 16
ENVELOPE_BYTES = 64 << 10
_encoder = msgspec.msgpack.Encoder()

# start(client, msg, ids, thinking, max_tokens, received_at): `thinking` when the prompt leaves the model inside
# <think>; `max_tokens` decided (the request's, else the rest of the context).
Start = Callable[[ClientState, cp.Generate, list[int], bool, int, float], None]


def message_bytes_for(max_model_len: int) -> int:
    """The largest client message worth reading when the model takes `max_model_len` tokens."""
    return max_model_len * BYTES_PER_TOKEN + ENVELOPE_BYTES


class Admission:
    def __init__(
        self,
        cfg: ServeConfig,
        tokenizer: TextTokenizer,
        metrics: Metrics,
        *,
        refusal: Callable[[], str | None],
        engine_info: Callable[[], ep.WorkerReady | None],
        start: Start,
        send: Callable[[ClientState, cp.Reply], None],
        in_flight_changed: Callable[[], None],
        checkpoint_max_len: int = 0,
    ):
        """`refusal()`: why no request can be admitted now (draining, engine not ready), else None.
        `start` registers an admitted request (see `Start`); it may raise ProtocolError.
        `checkpoint_max_len`: the checkpoint's max_position_embeddings (0: unknown), which bounds the engine's."""
        self.cfg = cfg
        self.checkpoint_max_len = checkpoint_max_len
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._refusal = refusal
        self._engine_info = engine_info
        self._start = start
        self._send = send
        self._in_flight_changed = in_flight_changed
        self._pool = concurrent.futures.ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="moed-tokenize")
        self._tasks: set[asyncio.Task] = set()

    @property
    def max_message_bytes(self) -> int:
        """The largest message answered: the configured value, else sized to the engine's max_model_len (to the
        checkpoint's until the engine has said, to 8 MiB when neither is known)."""
        if self.cfg.max_message_bytes:
            return self.cfg.max_message_bytes
        info = self._engine_info()
        max_len = info.max_model_len if info else self.checkpoint_max_len
        return message_bytes_for(max_len) if max_len else 8 << 20

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
            refuse(
                "too_many_requests",
                f"{what} {held} requests (choices) in flight and this one asks for {msg.n} more ({key}={client.limit})",
            )
        if msg.model is not None and msg.model != self.cfg.served_name:
            raise cp.ProtocolError(
                "invalid_request",
                f"model {msg.model!r} is not served here; this daemon serves {self.cfg.served_name!r}",
                "model",
                msg.id,
            )
        size = self.check_sizes(msg)
        if msg.tools or msg.chat_template_kwargs:  # rendered by the template too (tools as JSON)
            size += len(_encoder.encode(msg.tools)) + len(_encoder.encode(msg.chat_template_kwargs))
        if size > THREAD_TOKENIZE_CHARS:
            client.requests[msg.id] = None
            self._in_flight_changed()
            task = asyncio.get_running_loop().create_task(self._admit_in_thread(client, msg, now))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)
        else:
            ids, thinking = self.tokenize(msg)
            self._start(client, msg, ids, thinking, self.check_ids(msg, ids), now)

    def check_sizes(self, msg: cp.Generate) -> int:
        """Refuse what cannot fit max_model_len before any tokenising; returns the prompt's characters."""
        info = self._engine_info()
        max_len = info.max_model_len if info else 0
        s = msg.sampling
        # Text the template is sure to render: roles and contents (it may drop earlier turns' reasoning).
        chars = len(msg.prompt or "") + sum(len(m.role) + len(text_content(m.content)) for m in msg.messages or ())
        if not max_len:
            return chars
        if s.max_tokens is not None and s.max_tokens >= max_len:
            raise cp.ProtocolError(
                "invalid_request",
                f"max_tokens ({s.max_tokens}) leaves no room for a prompt: the model's max_model_len is {max_len}",
                "sampling.max_tokens",
                msg.id,
            )
        if msg.prompt_token_ids is not None:
            self._check_length(msg, len(msg.prompt_token_ids), max_len, "prompt_token_ids")
        if msg.messages is not None and len(msg.messages) >= max_len:
            raise cp.ProtocolError(
                "invalid_request",
                f"{len(msg.messages)} messages cannot fit the model's "
                f"max_model_len {max_len} (each takes at least one token)",
                "messages",
                msg.id,
            )
        most = max_len * self.tokenizer.max_token_chars
        if chars > most:
            where = "prompt" if msg.prompt is not None else "messages"
            raise cp.ProtocolError(
                "invalid_request",
                f"the {where} has {chars} characters; max_model_len {max_len} "
                f"tokens hold at most {most} ({self.tokenizer.max_token_chars} per token at most)",
                where,
                msg.id,
            )
        return chars

    def _check_length(self, msg: cp.Generate, n: int, max_len: int, where: str, more: bool = False) -> int:
        """Refuse a prompt of `n` tokens that leaves no room; returns the max_tokens to run."""
        if n >= max_len:
            raise cp.ProtocolError(
                "invalid_request",
                f"the prompt has {'more than ' if more else ''}{n} tokens; the "
                f"model takes at most {max_len} including generated ones",
                where,
                msg.id,
            )
        max_tokens = msg.sampling.max_tokens
        if max_tokens is None:
            return max_len - n
        if n + max_tokens > max_len:
            raise cp.ProtocolError(
                "invalid_request",
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's max_model_len {max_len}",
                "sampling.max_tokens",
                msg.id,
            )
        return max_tokens

    async def _admit_in_thread(self, client: ClientState, msg: cp.Generate, now: float) -> None:
        ids: list[int] | None = None
        thinking = False
        error: cp.ProtocolError | None = None
        try:
            ids, thinking = await asyncio.get_running_loop().run_in_executor(self._pool, self._tokenize_off_loop, msg)
        except cp.ProtocolError as e:
            error = e
        except Exception as e:  # a tokenizer bug costs this request, and its slot must not stay taken
            log.exception("tokenising request %r failed", msg.id)
            error = cp.ProtocolError(
                "internal", f"daemon error while tokenising: {type(e).__name__}: {e}", None, msg.id
            )
        if client.requests.get(msg.id, False) is None:
            del client.requests[msg.id]
        cancelled = msg.id in client.cancelled
        client.cancelled.discard(msg.id)
        try:
            if client.gone or cancelled:
                if not client.gone:
                    self._send(
                        client,
                        cp.Final(
                            id=msg.id,
                            finish_reason="abort",
                            prompt_tokens=len(ids or ()),
                            completion_tokens=0,
                            e2e_s=time.monotonic() - now,
                        ),
                    )
                return
            if error is not None:
                raise error
            if self._refusal() is not None:
                raise cp.ProtocolError(
                    "unavailable", "engine became unavailable while the prompt was tokenised", None, msg.id
                )
            self._start(client, msg, ids, thinking, self.check_ids(msg, ids), now)
        except cp.ProtocolError as e:
            self.metrics.protocol_errors.labels(e.code).inc()
            self._send(client, e.to_reply())
        except Exception as e:
            log.exception("admitting request %r failed", msg.id)
            self._send(client, cp.Error(id=msg.id, code="internal", message=f"daemon error: {e}"))
        finally:
            self._in_flight_changed()

    def _tokenize_off_loop(self, msg: cp.Generate) -> tuple[list[int], bool]:
        try:
            return self.tokenize(msg)
        finally:
            if len(msg.prompt or "") + sum(len(text_content(m.content)) for m in msg.messages or ()) > TRIM_AFTER_CHARS:
                memory.trim()

    def tokenize(self, msg: cp.Generate) -> tuple[list[int], bool]:
        """The prompt's ids, and whether it leaves the model inside <think> (chat with thinking on). Refuses a
        text that is past max_model_len before encoding all of it. Thread-safe."""
        info = self._engine_info()
        max_len = info.max_model_len if info else 0
        tok = self.tokenizer
        thinking = False
        if msg.prompt_token_ids is not None:
            ids, where = list(msg.prompt_token_ids), "prompt_token_ids"
        else:
            if msg.prompt is not None:
                text, special, where = msg.prompt, True, "prompt"
            else:
                where = "messages"
                try:
                    tools = msgspec.to_builtins(msg.tools) if msg.tools is not None else None
                    text = tok.render_chat(
                        template_messages(msg.messages), msg.add_generation_prompt, tools, msg.chat_template_kwargs
                    )
                except ChatInputError as e:
                    raise cp.ProtocolError("invalid_request", str(e), e.field, msg.id) from None
                except TemplateError as e:
                    raise cp.ProtocolError("invalid_request", str(e), "messages", msg.id) from None
                special = False  # the template writes the special tokens itself (as apply_chat_template does)
                thinking = prompt_opens_reasoning(text)
            if max_len and len(text) > max_len:  # may hold more than max_len tokens: count first, stop early
                n = tok.count_tokens(text, special, stop_after=max_len + tok.count_slack(len(text)))
                if n > max_len + tok.count_slack(len(text)):
                    self._check_length(msg, n, max_len, where, more=True)
            ids = tok.encode(text, add_special_tokens=special)
        if not ids:
            raise cp.ProtocolError("invalid_request", f"{where} encodes to no tokens", where, msg.id)
        return ids, thinking

    def check_ids(self, msg: cp.Generate, ids: list[int]) -> int:
        """The prompt's ids against the engine's vocabulary and max_model_len; returns the max_tokens to run (the
        request's, else the rest of the context)."""
        info = self._engine_info()
        vocab = info.vocab_size if info else self.tokenizer.vocab_size
        s = msg.sampling
        if msg.prompt_token_ids is not None and max(ids) >= vocab:  # max() first: no Python loop over a long prompt
            i, t = next((i, t) for i, t in enumerate(ids) if t >= vocab)
            raise cp.ProtocolError(
                "invalid_request",
                f"token id {t} is outside the vocabulary (0..{vocab - 1})",
                f"prompt_token_ids[{i}]",
                msg.id,
            )
        for i, t in enumerate(s.stop_token_ids):
            if t >= vocab:
                raise cp.ProtocolError(
                    "invalid_request",
                    f"token id {t} is outside the vocabulary (0..{vocab - 1})",
                    f"sampling.stop_token_ids[{i}]",
                    msg.id,
                )
        max_len = info.max_model_len if info else 0
        if max_len:
            return self._check_length(msg, len(ids), max_len, "prompt")
        return s.max_tokens if s.max_tokens is not None else 1
