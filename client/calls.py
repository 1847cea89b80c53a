"""What a client call sends and returns: Generate messages from keyword arguments, results, errors.

Shared by the sync and asyncio clients. Sampling keywords are checked here with the protocol's own
constraints (msgspec), so a bad value fails before it is sent, with the same field name the daemon
would report.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgspec

from moed.client import protocol as cp

DEFAULT_ADDRESS = "tcp://127.0.0.1:5710"  # also the daemon's default `listen`
ADDRESS_ENV = "MOED_ADDRESS"  # where `moed client` finds the daemon when --address is not given
SAMPLING_KEYS = frozenset(cp.SamplingParams.__struct_fields__)


class MoedError(Exception):
    """The daemon answered a request with an Error."""

    def __init__(self, code: str, message: str, field: str | None = None, request_id: str = ""):
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code, self.message, self.field, self.request_id = code, message, field, request_id

    @classmethod
    def from_reply(cls, err: cp.Error) -> MoedError:
        return cls(err.code, err.message, err.field, err.id)


class DaemonUnavailable(ConnectionError):
    """No answer from the daemon (down, unreachable, or restarted and lost the request)."""


class AuthenticationError(ConnectionError):
    """The daemon refused this client's Curve key, or the Curve handshake failed."""


class RequestTimeout(TimeoutError):
    """The call's timeout passed before the daemon finished the request (it was aborted)."""


@dataclass
class Delta:
    """New output of a streamed request. Chat output comes split: `text` is the answer, `reasoning` the model's
    thinking, `tool_calls` parts of the tool calls it makes (a call's first part has its id and name)."""

    text: str
    token_ids: list[int]
    logprobs: list[cp.TokenLogprob] | None = None
    reasoning: str = ""
    tool_calls: list[cp.ToolCallDelta] | None = None
    index: int = 0  # the choice (n > 1)


@dataclass
class Completion:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop, length, tool_calls, abort, deadline
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    e2e_s: float
    logprobs: list[cp.TokenLogprob] | None = None
    stop: str | None = None  # the stop string that ended it
    reasoning: str = ""
    tool_calls: list[cp.ToolCallDelta] = field(default_factory=list)  # complete calls: id, name, JSON arguments
    index: int = 0
    choices: list[Completion] = field(default_factory=list)  # n > 1: every choice (this one is choices[0])


@dataclass
class Accumulator:
    """Collects one choice's chunks into its Completion."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[cp.TokenLogprob] | None = None
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, cp.ToolCallDelta] = field(default_factory=dict)

    def add(self, reply: cp.Chunk | cp.Final) -> Delta:
        self.text.append(reply.text)
        self.token_ids.extend(reply.token_ids)
        if reply.logprobs:
            self.logprobs = (self.logprobs or []) + reply.logprobs
        if reply.reasoning:
            self.reasoning.append(reply.reasoning)
        for d in reply.tool_calls or ():
            call = self.calls.setdefault(d.index, cp.ToolCallDelta(index=d.index))
            call.id, call.name = call.id or d.id, call.name or d.name
            call.arguments += d.arguments
        return Delta(reply.text, reply.token_ids, reply.logprobs, reply.reasoning, reply.tool_calls, reply.index)

    def complete(self, final: cp.Final) -> Completion:
        self.add(final)
        return Completion(
            id=final.id,
            text="".join(self.text),
            token_ids=self.token_ids,
            finish_reason=final.finish_reason,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            ttft_s=final.ttft_s,
            e2e_s=final.e2e_s,
            logprobs=self.logprobs,
            stop=final.stop,
            reasoning="".join(self.reasoning),
            tool_calls=[self.calls[i] for i in sorted(self.calls)],
            index=final.index,
        )


class Choices:
    """A request's n choices: their chunks and Finals in, Deltas and Completions out."""

    def __init__(self, n: int):
        self.n = n
        self._acc: dict[int, Accumulator] = {}
        self.done: dict[int, Completion] = {}

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.n

    def add(self, reply: cp.Chunk | cp.Final) -> Delta | None:
        """The Delta the reply carries (None: a Final with nothing new)."""
        acc = self._acc.setdefault(reply.index, Accumulator())
        if isinstance(reply, cp.Chunk):
            return acc.add(reply)
        has_tail = bool(reply.text or reply.token_ids or reply.reasoning or reply.tool_calls)
        self.done[reply.index] = acc.complete(reply)
        return (
            Delta(reply.text, reply.token_ids, reply.logprobs, reply.reasoning, reply.tool_calls, reply.index)
            if has_tail
            else None
        )

    def completion(self) -> Completion:
        """Choice 0's Completion; with n > 1 its `choices` lists all of them."""
        first = self.done[0]
        if self.n == 1:
            return first
        return dataclasses.replace(first, choices=[self.done[i] for i in sorted(self.done)])


class StreamState:
    """What the sync and async streams share: the request, its accumulated output, and one reply's effect."""

    def __init__(self, client: Any, request_id: str, deadline: float | None, n: int = 1):
        self.client = client
        self.id = request_id
        self._deadline = deadline
        self._choices = Choices(n)
        self.completion: Completion | None = None
        self._open = True

    @property
    def text(self) -> str:
        acc = self._choices._acc.get(0)
        return "".join(acc.text) if acc else ""

    def _advance(self, reply: Any) -> Delta | None:
        """Returns the delta to yield (None: nothing to yield); the last Final, or an Error, closes the stream, and
        an Error raises."""
        if isinstance(reply, cp.Chunk):
            return self._choices.add(reply)
        if not isinstance(reply, (cp.Final, cp.Error)):
            return None
        if isinstance(reply, cp.Error):
            self._open = False
            self.client._finished(self.id)
            raise MoedError.from_reply(reply)
        delta = self._choices.add(reply)
        if self._choices.complete:
            self._open = False
            self.client._finished(self.id)
            self.completion = self._choices.completion()
        return delta


class RequestIds:
    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._n = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._n)}"


def build_generate(
    request_id: str,
    prompt: str | None = None,
    *,
    token_ids: list[int] | None = None,
    messages: list[dict[str, Any]] | None = None,
    stream: bool,
    deadline_s: float | None = None,
    model: str | None = None,
    skip_special_tokens: bool = True,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    parse_output: bool = True,
    n: int = 1,
    **sampling: Any,
) -> cp.Generate:
    """A checked Generate; sampling keywords are cp.SamplingParams fields (`stop` may be one string). Chat
    (messages): `tools` as OpenAI function definitions, `chat_template_kwargs` such as {"enable_thinking": False}."""
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise TypeError(
            f"unknown sampling argument(s) {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(SAMPLING_KEYS))}"
        )
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    msg_dict: dict[str, Any] = {
        "id": request_id,
        "stream": stream,
        "sampling": sampling,
        "skip_special_tokens": skip_special_tokens,
        "add_generation_prompt": add_generation_prompt,
        "parse_output": parse_output,
        "n": n,
    }
    for key, value in (
        ("prompt", prompt),
        ("prompt_token_ids", token_ids),
        ("messages", messages),
        ("deadline_s", deadline_s),
        ("model", model),
        ("tools", tools),
        ("tool_choice", tool_choice),
        ("chat_template_kwargs", chat_template_kwargs),
    ):
        if value is not None:
            msg_dict[key] = value
    try:
        msg = msgspec.convert(msg_dict, cp.Generate)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid request: {e} (field {cp.error_field(e)})") from None
    try:
        cp.check_generate(msg)
    except cp.ProtocolError as e:
        raise ValueError(f"invalid request: {e.message} (field {e.field})") from None
    return msg
