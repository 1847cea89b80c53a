"""What a client call sends and returns: Generate messages from keyword arguments, results, errors.

Shared by the sync and asyncio clients. Sampling keywords are checked here with the protocol's own
constraints (msgspec), so a bad value fails before it is sent, with the same field name the daemon
would report.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgspec

from moed.client import protocol as cp

DEFAULT_ADDRESS = "tcp://127.0.0.1:5710"
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
    """New output of a streamed request."""

    text: str
    token_ids: list[int]
    logprobs: list[cp.TokenLogprob] | None = None


@dataclass
class Completion:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop, length, abort, deadline
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    e2e_s: float
    logprobs: list[cp.TokenLogprob] | None = None
    stop: str | None = None  # the stop string that ended it


@dataclass
class Accumulator:
    """Collects a request's chunks into its Completion."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[cp.TokenLogprob] | None = None

    def add(self, text: str, token_ids: list[int], logprobs: list[cp.TokenLogprob] | None) -> Delta:
        self.text.append(text)
        self.token_ids.extend(token_ids)
        if logprobs:
            self.logprobs = (self.logprobs or []) + logprobs
        return Delta(text, token_ids, logprobs)

    def complete(self, final: cp.Final) -> Completion:
        self.add(final.text, final.token_ids, final.logprobs)
        return Completion(id=final.id, text="".join(self.text), token_ids=self.token_ids,
                          finish_reason=final.finish_reason, prompt_tokens=final.prompt_tokens,
                          completion_tokens=final.completion_tokens, ttft_s=final.ttft_s, e2e_s=final.e2e_s,
                          logprobs=self.logprobs, stop=final.stop)


class StreamState:
    """What the sync and async streams share: the request, its accumulated output, and one reply's effect."""

    def __init__(self, client: Any, request_id: str, deadline: float | None):
        self.client = client
        self.id = request_id
        self._deadline = deadline
        self._acc = Accumulator()
        self.completion: Completion | None = None
        self._open = True

    @property
    def text(self) -> str:
        return "".join(self._acc.text)

    def _advance(self, reply: Any) -> Delta | None:
        """Returns the delta to yield (None: nothing to yield); a Final or Error closes the stream, and an
        Error raises."""
        if isinstance(reply, cp.Chunk):
            return self._acc.add(reply.text, reply.token_ids, reply.logprobs)
        if not isinstance(reply, (cp.Final, cp.Error)):
            return None
        self._open = False
        self.client._finished(self.id)
        if isinstance(reply, cp.Error):
            raise MoedError.from_reply(reply)
        has_tail = bool(reply.text or reply.token_ids)
        self.completion = self._acc.complete(reply)
        return Delta(reply.text, reply.token_ids, reply.logprobs) if has_tail else None


class RequestIds:
    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._n = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._n)}"


def build_generate(request_id: str, prompt: str | None = None, *, token_ids: list[int] | None = None,
                   messages: list[dict[str, str]] | None = None, stream: bool, deadline_s: float | None = None,
                   model: str | None = None, skip_special_tokens: bool = True, add_generation_prompt: bool = True,
                   **sampling: Any) -> cp.Generate:
    """A checked Generate; sampling keywords are cp.SamplingParams fields (`stop` may be one string)."""
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(sorted(unknown))}; accepted: "
                        f"{', '.join(sorted(SAMPLING_KEYS))}")
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    msg_dict: dict[str, Any] = {"id": request_id, "stream": stream, "sampling": sampling,
                                "skip_special_tokens": skip_special_tokens,
                                "add_generation_prompt": add_generation_prompt}
    for key, value in (("prompt", prompt), ("prompt_token_ids", token_ids), ("messages", messages),
                       ("deadline_s", deadline_s), ("model", model)):
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
