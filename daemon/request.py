"""One choice of a generate request in the daemon: engine outputs in, client replies out.

Owns the choice's text: incremental detokenisation, stop strings and the hold-back that keeps a
possible stop string's beginning out of streamed chunks. The engine never sees text, so when a
stop string matches here the text is cut just before it, the choice finishes with reason "stop",
and the caller must send the engine `Abort(reason="stop")` (`EngineUpdate.abort_engine`). Token
ids are not cut: the ids of the step that completed the stop string are all reported. For chat
requests the released text then goes through GLM-5.1's output parser (daemon/glm_chat.py): replies
carry the answer as `text`, the reasoning and the parsed tool-call deltas beside it.
A request with n choices is n GenerateRequests (one engine request each) sharing the client's id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from moed.client import protocol as cp
from moed.daemon.detokenizer import IncrementalDetokenizer, StopStrings
from moed.daemon.glm_chat import ChatDelta, ChatOutputParser, merge_tool_calls
from moed.engine import protocol as ep


@dataclass(slots=True)
class EngineUpdate:
    replies: list[cp.Chunk | cp.Final | cp.Error]
    done: bool = False
    abort_engine: bool = False  # a stop string matched: the engine must drop the request
    finish_reason: str | None = None  # for metrics: stop, length, abort, deadline, error
    itl: tuple[float, int] | None = None  # (seconds since the previous token, tokens): inter-token latency
    ttft: float | None = None
    queue: float | None = None  # receipt -> first scheduled in the engine (with the first tokens)
    prefill: float | None = None  # first scheduled -> first token
    decode: float | None = None  # first -> last token (when the engine finished the request)


class GenerateRequest:
    def __init__(
        self,
        client: bytes,
        msg: cp.Generate,
        engine_id: str,
        prompt_ids: list[int],
        detok: IncrementalDetokenizer,
        received_at: float,
        deadline_at: float | None,
        generation: int,
        index: int = 0,
        chat: ChatOutputParser | None = None,
    ):
        self.client = client
        self.id = msg.id
        self.index = index  # the choice
        self.chat = chat  # None: the raw text goes out
        self._chat_kept = ChatDelta()  # stream=False: parsed output released so far
        self.engine_id = engine_id
        self.stream = msg.stream
        self.want_logprobs = msg.sampling.logprobs is not None
        self.prompt_tokens = len(prompt_ids)
        self.detok = detok
        self.stops = StopStrings(msg.sampling.stop)
        self.received_at = received_at
        self.sent_at = time.monotonic()  # built as its AddRequest goes to the engine
        self.deadline_at = deadline_at
        self.generation = generation  # the worker incarnation that holds it
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._unsent = ""  # text not yet handed out: held back for stop matching
        self._parts: list[str] = []  # stream=False: text released so far
        self._ids: list[int] = []  # stream=False: all ids
        self._logprobs: list[cp.TokenLogprob] = []  # stream=False: all logprobs

    def _final(
        self,
        reason: str,
        now: float,
        text: str,
        ids: list[int],
        logprobs: list[cp.TokenLogprob] | None,
        stop: str | None = None,
    ) -> cp.Final:
        reasoning, calls = "", None
        if self.chat is not None:
            delta = self.chat.feed(text) if text else ChatDelta()
            rest, retracted = self.chat.finish(whole=not self.stream)
            delta.extend(rest)
            if not self.stream:
                kept = self._chat_kept
                kept.extend(delta)
                delta = ChatDelta(
                    kept.reasoning, kept.content, merge_tool_calls([d for d in kept.tool_calls if d.index != retracted])
                )
                self._parts = []
            text, reasoning = delta.content, delta.reasoning
            calls = _wire_calls(delta)
            if reason == "stop" and self.chat.called_tools:
                reason = "tool_calls"
        if not self.stream:
            self._parts.append(text)
            text, ids, logprobs = "".join(self._parts), self._ids + ids, (self._logprobs + (logprobs or []))
        return cp.Final(
            id=self.id,
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,  # type: ignore[arg-type]
            completion_tokens=self.completion_tokens,
            e2e_s=now - self.received_at,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.received_at,
            text=text,
            token_ids=ids,
            logprobs=logprobs if self.want_logprobs else None,
            stop=stop,
            index=self.index,
            reasoning=reasoning,
            tool_calls=calls,
        )

    def _chunk(self, text: str, ids: list[int], logprobs: list[cp.TokenLogprob] | None) -> cp.Chunk | None:
        """A streamed reply (None: nothing to send)."""
        if self.chat is None:
            if not (text or ids):
                return None
            return cp.Chunk(id=self.id, text=text, token_ids=ids, logprobs=logprobs, index=self.index)
        delta = self.chat.feed(text) if text else ChatDelta()
        if not (delta or ids):
            return None
        return cp.Chunk(
            id=self.id,
            text=delta.content,
            token_ids=ids,
            logprobs=logprobs,
            index=self.index,
            reasoning=delta.reasoning,
            tool_calls=_wire_calls(delta),
        )

    def on_output(self, out: ep.RequestOutput, now: float) -> EngineUpdate:
        upd = EngineUpdate(replies=[])
        ids = out.new_token_ids
        logprobs = None
        if out.logprobs and self.want_logprobs:
            logprobs = [cp.TokenLogprob(lp.token_id, lp.logprob, [tuple(t) for t in lp.top]) for lp in out.logprobs]
        if ids:
            if self.first_token_at is None:
                self.first_token_at = now
                upd.ttft = now - self.received_at
                if out.queue_s is not None:
                    upd.queue = self.sent_at - self.received_at + out.queue_s
                    upd.prefill = max(0.0, upd.ttft - upd.queue)
            elif self.last_token_at is not None:
                upd.itl = (now - self.last_token_at, len(ids))
            self.last_token_at = now
            self.completion_tokens += len(ids)
        finished = out.finish_reason is not None
        if finished and self.first_token_at is not None:
            upd.decode = self.last_token_at - self.first_token_at
        if finished and out.finish_reason == "error":
            upd.done, upd.finish_reason = True, "error"
            upd.replies.append(
                cp.Error(
                    id=self.id,
                    code="engine_error",
                    message=f"engine failed the request: {out.error or 'no reason given'}",
                )
            )
            return upd
        delta = self.detok.add(ids) if ids else ""
        if finished:
            delta += self.detok.flush()
        stops = self.stops
        if not stops and not finished:  # the common case: text goes out as it comes
            if self.stream:
                chunk = self._chunk(delta, ids, logprobs)
                if chunk is not None:
                    upd.replies.append(chunk)
            else:
                self._keep(delta, ids, logprobs)
            return upd
        stop = None
        if delta:
            start = max(0, len(self._unsent) - stops.max_len + 1)
            self._unsent += delta
            if stops:
                match = stops.find(self._unsent, start)
                if match is not None:
                    self._unsent = self._unsent[: match[0]]
                    stop = match[1]
                    upd.abort_engine = not finished
                    finished = True
        if finished:
            reason = "stop" if stop is not None else out.finish_reason
            reason = reason if reason in ("stop", "length") else "abort"
            upd.done, upd.finish_reason = True, reason
            text, self._unsent = self._unsent, ""
            upd.replies.append(self._final(reason, now, text, list(ids), logprobs, stop))
            return upd
        hold = stops.holdback(self._unsent)
        cut = len(self._unsent) - hold
        text, self._unsent = self._unsent[:cut], self._unsent[cut:]
        if self.stream:
            chunk = self._chunk(text, ids, logprobs)
            if chunk is not None:
                upd.replies.append(chunk)
        else:
            self._keep(text, ids, logprobs)
        return upd

    def _keep(self, text: str, ids: list[int], logprobs: list[cp.TokenLogprob] | None) -> None:
        """stream=False: hold released output for the Final."""
        if text and self.chat is not None:
            self._chat_kept.extend(self.chat.feed(text))
        elif text:
            self._parts.append(text)
        self._ids.extend(ids)
        if logprobs:
            self._logprobs.extend(logprobs)

    def finish(self, reason: str, now: float) -> cp.Final:
        """End the request from the daemon's side (abort, deadline, disconnect, drain)."""
        text = self._unsent + self.detok.flush()
        self._unsent = ""
        return self._final(reason, now, text, [], None)


def _wire_calls(delta: ChatDelta) -> list[cp.ToolCallDelta] | None:
    if not delta.tool_calls:
        return None
    return [cp.ToolCallDelta(index=d.index, id=d.id, name=d.name, arguments=d.arguments) for d in delta.tool_calls]
