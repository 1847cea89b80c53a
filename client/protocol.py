"""The client protocol: typed msgspec messages between clients and the moed daemon over ZMQ.

Shared by the daemon (`moed.daemon`) and the client library (`moed.client`); imports only msgspec.
Wire format, both directions, one message = two ZMQ frames:

  frame 0  protocol header: ASCII b"moed:" + decimal version, e.g. b"moed:1"
  frame 1  body: one msgpack map, a message of the request union (client -> daemon) or of the reply
           union (daemon -> client), tagged by its "type" key

Clients use DEALER sockets; the daemon's ROUTER prepends the client's routing id. The header is
checked before the body is decoded, so a later version may change the body entirely and an older
daemon still answers it with an Error (code "unsupported_version") instead of a decode failure.
Bodies are decoded by msgspec into the Structs below and nothing else: no pickle, no extension types.

Request lifecycle: a Generate is answered by zero or more Chunk messages (only when stream=True),
then one Final per choice (`n` of them, each naming its choice by `index`; one when n=1), or one
Error for the whole request, which ends it. A Final carries whatever of its choice was not sent in
chunks (everything when stream=False), so a choice's full text is always its chunks' text + its
Final's, and the same holds for `reasoning` and for each tool call's `arguments`.
Chat output (a Generate with messages, unless parse_output=False) is split as GLM-5.1 writes it:
`reasoning` (the text inside <think>...</think>), `text` (the answer) and `tool_calls` (GLM's XML tool
calls, parsed when the request gives `tools` and tool_choice is not "none"; a call's first delta has its
id and name, later ones append to its JSON `arguments`). Token ids and logprobs are the raw tokens'.
Chunks, Finals and Errors that one engine step produced for several of a client's streams may
arrive together in one Batch.
Request ids are chosen by the client and must be unique among its in-flight requests.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

PROTOCOL_VERSION = 1
HEADER_PREFIX = b"moed:"
HEADER = HEADER_PREFIX + str(PROTOCOL_VERSION).encode()

RequestId = Annotated[str, Meta(min_length=1, max_length=256)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
TokenId = Annotated[int, Meta(ge=0)]

MAX_CHOICES = 16
# Final.finish_reason: "stop" (eos, a stop token id or a stop string), "length" (max_tokens),
# "tool_calls" (stopped after tool calls it parsed), "abort" (client abort, disconnect, drain),
# "deadline" (the request's deadline passed).
FinishReason = Literal["stop", "length", "tool_calls", "abort", "deadline"]
TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt"})  # not settable by chat_template_kwargs

ErrorCode = Literal[
    "invalid_request",  # a field failed validation; Error.field names it
    "malformed",  # the frames or the msgpack could not be read at all
    "unsupported_version",  # the header names a protocol version this daemon does not speak
    "message_too_large",  # body longer than the daemon's max_message_bytes
    "duplicate_id",  # a request with this id is already in flight for this client
    "too_many_requests",  # the client's concurrency limit is reached
    "unavailable",  # engine loading, restarting, crash-looped, or the daemon is draining
    "unknown_request",  # a heartbeat named a request the daemon does not hold (daemon restarted?)
    "engine_error",  # the engine failed the request or its worker died
    "internal",  # a daemon bug; the message says what
]


def _doc(text: str, **constraints: Any) -> Meta:
    return Meta(description=text, **constraints)


class SamplingParams(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling and stopping, declared once for every side: the client library and `moed client` / `moed generate`
    flags (their help is the descriptions here), the daemon's request decoding and the engine (`moed.engine.protocol`
    re-exports this class). Constraints are checked wherever a value arrives: decoding a message, and
    `check_sampling` for values built in Python. Stop strings are matched by the daemon on the detokenised text;
    the engine sees token ids only."""

    temperature: Annotated[float, _doc("sampling temperature; 0 = greedy", ge=0.0, le=100.0)] = 0.0
    top_k: Annotated[int, _doc("sample from the k most likely tokens; 0 = off", ge=0)] = 0
    top_p: Annotated[
        float, _doc("nucleus sampling: the smallest set of tokens with this much probability", gt=0.0, le=1.0)
    ] = 1.0
    min_p: Annotated[float, _doc("drop tokens less likely than min_p x the most likely one", ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[
        float, _doc("divides the logits of tokens already in the prompt or output; 1 = off", gt=0.0, le=100.0)
    ] = 1.0
    frequency_penalty: Annotated[
        float, _doc("subtracted per occurrence of a token in the output; 0 = off", ge=-2.0, le=2.0)
    ] = 0.0
    presence_penalty: Annotated[
        float, _doc("subtracted once from tokens present in the output; 0 = off", ge=-2.0, le=2.0)
    ] = 0.0
    seed: (
        Annotated[int, _doc("per-request seed: the same seed and prompt give the same tokens", ge=0, le=2**63 - 1)]
        | None
    ) = None
    max_tokens: (
        Annotated[int, _doc("tokens generated at most; none = up to the model's context length", ge=1)] | None
    ) = 256
    stop: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=1024)]],
        _doc("strings that end the output (not included)", max_length=16),
    ] = []
    stop_token_ids: Annotated[list[TokenId], _doc("token ids that end the output", max_length=64)] = []
    ignore_eos: Annotated[bool, _doc("keep generating past the model's end-of-sequence tokens")] = False
    logprobs: (
        Annotated[int, _doc("return each token's logprob and the n most likely alternatives", ge=0, le=20)] | None
    ) = None


_sampling_decoder = msgspec.msgpack.Decoder(SamplingParams)


def check_sampling(sp: SamplingParams) -> None:
    """Raise ValueError naming the field (`sampling.top_p: ...`) if a SamplingParams built in Python breaks a
    constraint (messages are checked as they are decoded)."""
    try:
        _sampling_decoder.decode(_encoder.encode(sp))
    except msgspec.ValidationError as e:
        raise ValueError(f"sampling.{error_field(e) or ''}: {e}") from None


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    """One part of a message's content in list form (OpenAI's); GLM-5.1 reads text only."""

    text: str


class FunctionCall(Struct, forbid_unknown_fields=True):
    name: NonEmptyStr
    arguments: str = "{}"  # a JSON object, as OpenAI sends it


class ToolCall(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A tool call of an earlier assistant turn."""

    function: FunctionCall
    id: str = ""
    type: Literal["function"] = "function"


class ChatMessage(Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: NonEmptyStr
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool results
    reasoning_content: str | None = None  # assistant turns: their reasoning (the template keeps the last turn's)


class FunctionDefinition(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: NonEmptyStr
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema; arguments it types "string" are read verbatim
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True, omit_defaults=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


# client -> daemon


class Generate(Struct, tag="generate", tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of prompt, prompt_token_ids, messages (rendered with the checkpoint's chat template)."""

    id: RequestId
    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = True
    deadline_s: Annotated[float, Meta(gt=0.0)] | None = None  # seconds after the daemon receives it
    model: str | None = None  # when set, must name the served model
    skip_special_tokens: bool = True
    add_generation_prompt: bool = True  # chat only
    tools: list[Tool] | None = None  # chat only: given to the chat template; tool calls are parsed from the output
    tool_choice: Literal["none", "auto", "required"] | None = None  # "none": tool calls are not parsed
    chat_template_kwargs: dict[str, Any] | None = None  # chat only: further template variables (enable_thinking)
    parse_output: bool = True  # chat only: split reasoning and parse tool calls (False: the raw text)
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1  # choices sampled from the prompt (seed + i for choice i)


class Abort(Struct, tag="abort", tag_field="type", forbid_unknown_fields=True):
    id: RequestId


class Heartbeat(Struct, tag="heartbeat", tag_field="type", forbid_unknown_fields=True):
    """Sent while a client waits; answered by a Pong, and by an Error for each id the daemon does not hold."""

    ids: Annotated[list[RequestId], Meta(max_length=4096)] = []


class Health(Struct, tag="health", tag_field="type", forbid_unknown_fields=True):
    id: RequestId


class Ready(Struct, tag="ready", tag_field="type", forbid_unknown_fields=True):
    id: RequestId


class Stats(Struct, tag="stats", tag_field="type", forbid_unknown_fields=True):
    id: RequestId


class Models(Struct, tag="models", tag_field="type", forbid_unknown_fields=True):
    id: RequestId


class Placement(Struct, tag="placement", tag_field="type", forbid_unknown_fields=True):
    """Expert placement: get the pinned experts, pin or unpin one (layer, expert), or reset all pins."""

    id: RequestId
    op: Literal["get", "pin", "unpin", "reset"]
    layer: Annotated[int, Meta(ge=0)] | None = None
    expert: Annotated[int, Meta(ge=0)] | None = None


Request = Generate | Abort | Heartbeat | Health | Ready | Stats | Models | Placement


# daemon -> client


class TokenLogprob(Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


class ToolCallDelta(Struct, omit_defaults=True):
    """Part of a parsed tool call: its first delta has id and name; every delta's arguments append to its JSON."""

    index: int  # which call of the choice, from 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Chunk(Struct, tag="chunk", tag_field="type", omit_defaults=True):
    id: str
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice (n > 1)
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None


class Final(Struct, tag="final", tag_field="type", omit_defaults=True):
    id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    e2e_s: float  # daemon receipt -> this message
    ttft_s: float | None = None  # daemon receipt -> first generated token (None: none generated)
    text: str = ""  # what no Chunk carried
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    stop: str | None = None  # the stop string that ended the request, if one did
    index: int = 0  # the choice (n > 1): the request ends with the last choice's Final
    reasoning: str = ""  # what no Chunk carried
    tool_calls: list[ToolCallDelta] | None = None  # what no Chunk carried (stream=False: one complete entry per call)


class Error(Struct, tag="error", tag_field="type", omit_defaults=True):
    id: str  # "" when the request's id could not be read
    code: ErrorCode
    message: str
    field: str | None = None  # dotted path of the offending field, e.g. "sampling.top_p"


class Pong(Struct, tag="pong", tag_field="type"):
    daemon_id: str  # random per daemon start: a change means in-flight requests were lost


class HealthStatus(Struct, tag="health_status", tag_field="type"):
    id: str
    ok: bool
    state: str  # engine state: starting, loading, ready, restarting, crash_loop, failed, stopping
    uptime_s: float


class ReadyStatus(Struct, tag="ready_status", tag_field="type"):
    id: str
    ready: bool
    reason: str  # "" when ready


class StatsReport(Struct, tag="stats_report", tag_field="type"):
    id: str
    ready: bool
    state: str
    requests_in_flight: int
    clients: int
    running: int
    waiting: int
    kv_usage: float
    prompt_tokens: int
    generation_tokens: int
    worker_restarts: int
    engine_stats_age_s: float | None  # seconds since the engine's last stats (None: none yet)
    uptime_s: float


class ModelInfo(Struct, array_like=False):
    name: str
    path: str
    max_model_len: int
    vocab_size: int


class ModelList(Struct, tag="model_list", tag_field="type"):
    id: str
    models: list[ModelInfo]


class PlacementResult(Struct, tag="placement_result", tag_field="type"):
    id: str
    ok: bool
    message: str = ""
    pinned: dict[str, list[int]] = {}  # layer -> pinned experts


class Batch(Struct, tag="batch", tag_field="type"):
    """Several replies for one client from one engine step, in order: read as if they came one by one.
    The daemon sends this instead of one message per stream when a client holds several streams."""

    items: list[Chunk | Final | Error]


Reply = Chunk | Final | Error | Pong | HealthStatus | ReadyStatus | StatsReport | ModelList | PlacementResult | Batch


class ProtocolError(Exception):
    """A message that cannot be accepted; becomes an Error reply with the same code and field."""

    def __init__(self, code: str, message: str, field: str | None = None, request_id: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id

    def to_reply(self) -> Error:
        return Error(id=self.request_id, code=self.code, message=self.message, field=self.field)  # type: ignore[arg-type]


class _ExtRefused(ValueError):
    """A msgpack extension value: no field takes one, but an Any-typed field (tool schemas, template variables)
    would keep it and fail later, inside the daemon, instead of at decoding."""


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise _ExtRefused(f"msgpack extension values (type {code}) are not accepted in any field")


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request, ext_hook=_refuse_ext)
_reply_decoder = msgspec.msgpack.Decoder(Reply, ext_hook=_refuse_ext)


class _AnyId(Struct):
    id: str = ""


_id_decoder = msgspec.msgpack.Decoder(_AnyId)

_PATH = re.compile(r" - at `\$\.?(.*)`$")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


def error_field(err: msgspec.ValidationError) -> str | None:
    """The dotted field path a msgspec validation error points at, e.g. 'sampling.stop[0]'."""
    text = str(err)
    m = _PATH.search(text)
    path = m.group(1) if m else ""
    n = _NAMED.search(text)
    if n:
        path = f"{path}.{n.group(1)}" if path else n.group(1)
    return path or None


def encode(msg: Request | Reply) -> list[bytes]:
    """The two frames of one message."""
    return [HEADER, _encoder.encode(msg)]


def check_header(frame: bytes | memoryview) -> None:
    """Raise ProtocolError unless the frame is this version's header."""
    head = bytes(frame[:17])  # never copy more of a hostile frame than a header can hold
    if head == HEADER and len(frame) == len(HEADER):
        return
    if not head.startswith(HEADER_PREFIX) or len(frame) > 16:
        raise ProtocolError(
            "malformed",
            f"first frame must be the protocol header {HEADER!r}, got {head[:16]!r}"
            + (f" ... ({len(frame)} bytes)" if len(frame) > 16 else ""),
        )
    raise ProtocolError(
        "unsupported_version",
        f"protocol version {head[len(HEADER_PREFIX) :].decode(errors='replace')!r} is not supported; "
        f"this side speaks version {PROTOCOL_VERSION} (header {HEADER!r})",
    )


def _decode(body: bytes | memoryview, decoder: msgspec.msgpack.Decoder, what: str):
    """Decode untrusted bytes: whatever they hold, the only exception that leaves is ProtocolError."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise ProtocolError("invalid_request", f"invalid {what}: {e}", error_field(e), message_id(body)) from None
    except msgspec.DecodeError as e:
        raise ProtocolError("malformed", f"{what} is not valid msgpack: {e}") from None
    except _ExtRefused as e:
        raise ProtocolError("invalid_request", f"invalid {what}: {e}", None, message_id(body)) from None
    except RecursionError:  # msgspec recurses per nesting level, within Python's recursion limit
        raise ProtocolError("malformed", f"{what} nests arrays or maps too deeply to be read") from None
    except Exception as e:  # not expected from msgspec, but a hostile body must never escape as a crash
        raise ProtocolError("malformed", f"{what} cannot be decoded ({type(e).__name__}: {e})") from None


def message_id(body: bytes | memoryview) -> str:
    """The id of a message that cannot be accepted, for its Error reply; "" when none can be read. Costs a scan
    of the body in C (other values are skipped, not built)."""
    try:
        rid = _id_decoder.decode(body).id  # skips the other fields' values, recursing into them
    except Exception:  # not msgpack, no string id, nested too deeply (RecursionError): the reply names no id
        return ""
    return rid if 0 < len(rid) <= 256 else ""  # an id no request may carry is not echoed


def decode_request(body: bytes | memoryview) -> Request:
    msg = _decode(body, _request_decoder, "request")
    if isinstance(msg, Generate):
        check_generate(msg)
    return msg


def decode_reply(body: bytes | memoryview) -> Reply:
    return _decode(body, _reply_decoder, "reply")


def check_generate(msg: Generate) -> None:
    """Checks msgspec's types cannot express; raises ProtocolError naming the field."""
    given = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(msg, n) is not None]
    if len(given) != 1:
        raise ProtocolError(
            "invalid_request",
            f"exactly one of prompt, prompt_token_ids, messages must be given (got {', '.join(given) or 'none'})",
            given[1] if len(given) > 1 else "prompt",
            msg.id,
        )
    if msg.prompt_token_ids is not None and not msg.prompt_token_ids:
        raise ProtocolError("invalid_request", "prompt_token_ids is empty", "prompt_token_ids", msg.id)
    if msg.messages is not None and not msg.messages:
        raise ProtocolError("invalid_request", "messages is empty", "messages", msg.id)
    if msg.messages is None:
        for name in ("tools", "tool_choice", "chat_template_kwargs"):
            if getattr(msg, name) is not None:
                raise ProtocolError("invalid_request", f"{name} applies to chat requests (messages) only", name, msg.id)
        return
    for i, m in enumerate(msg.messages):
        if m.content is None and m.role != "assistant":
            raise ProtocolError(
                "invalid_request", f"a {m.role!r} message needs content", f"messages[{i}].content", msg.id
            )
    reserved = TEMPLATE_NAMES.intersection(msg.chat_template_kwargs or ())
    if reserved:
        raise ProtocolError(
            "invalid_request",
            f"chat_template_kwargs cannot set {', '.join(sorted(reserved))} (they are the request's own fields)",
            "chat_template_kwargs",
            msg.id,
        )
    if msg.tool_choice == "required" and not msg.tools:
        raise ProtocolError("invalid_request", "tool_choice 'required' needs tools", "tool_choice", msg.id)
