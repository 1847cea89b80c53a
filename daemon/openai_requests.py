"""OpenAI request bodies: their schemas, decoding within the daemon's limits, and translation to moed's protocol.

A body is decoded with msgspec into the structs below (fields OpenAI-compatible servers do not know are
ignored, as vLLM ignores them) and turned into one protocol Generate per prompt, so that admission and
limits are the ZMQ path's. Fields beyond OpenAI's that vLLM also takes: top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, skip_special_tokens, chat_template_kwargs (e.g. {"enable_thinking": false}),
add_generation_prompt, return_token_ids. Sampling defaults for fields a request leaves out come from the
checkpoint's generation_config.json (as vLLM's default `--generation-config auto`), else OpenAI's;
max_tokens defaults to the rest of the model's context. Errors are OpenAI's shape (`ApiError`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import msgspec
from fastapi import Request
from msgspec import Struct

from moed.client import protocol as cp

BIG_BODY_BYTES = 256 << 10  # bodies larger than this are decoded in a thread (the loop keeps its time slices)


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


# --- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {
            400: "invalid_request_error",
            401: "invalid_request_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_STATUS = {
    "invalid_request": 400,
    "malformed": 400,
    "duplicate_id": 400,
    "message_too_large": 413,
    "too_many_requests": 429,
    "unavailable": 503,
    "engine_error": 500,
    "internal": 500,
    "unknown_request": 500,
}


def _param(field: str | None) -> str | None:
    """The OpenAI request field a protocol error's field path names."""
    if field is None:
        return None
    return field.removeprefix("sampling.").replace("prompt_token_ids", "prompt")


def error_from_reply(err: cp.Error) -> ApiError:
    return ApiError(_STATUS.get(err.code, 500), err.message, _param(err.field), err.code)


def unknown_model(name: str, served_name: str) -> ApiError:
    return ApiError(
        404, f"the model {name!r} does not exist; this server serves {served_name!r}", "model", "model_not_found"
    )


# --- decoding and translation -------------------------------------------------------------------


async def decode_body(request: Request, kind: type[Struct], limit: int) -> Any:
    """The request's body as `kind`; raises ApiError (413 over `limit` bytes, 400 not such a body)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(
            413, f"request body of {length} bytes exceeds max_message_bytes={limit}", None, "request_too_large"
        )
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


def to_generates(
    body: CompletionRequest | ChatRequest, chat: bool, served_name: str, defaults: dict[str, Any]
) -> list[cp.Generate]:
    """The protocol messages for a request (one per prompt); raises ApiError naming the field."""
    if body.model is not None and body.model != served_name:
        raise unknown_model(body.model, served_name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_tokens = body.max_tokens
    sampling: dict[str, Any] = {
        "temperature": _pick(body.temperature, defaults.get("temperature"), 1.0),
        "top_p": _pick(body.top_p, defaults.get("top_p"), 1.0),
        "top_k": max(0, _pick(body.top_k, defaults.get("top_k"), 0)),
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "seed": body.seed,
        "stop": stop,
        "stop_token_ids": body.stop_token_ids or [],
        "ignore_eos": body.ignore_eos,
    }
    base: dict[str, Any] = {"stream": True, "n": body.n, "skip_special_tokens": body.skip_special_tokens}
    if chat:
        assert isinstance(body, ChatRequest)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else max_tokens
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(
                400, "response_format other than 'text' is not supported (no guided decoding)", "response_format"
            )
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


def _pick(value: Any, default: Any, fallback: Any) -> Any:
    return value if value is not None else (default if default is not None else fallback)


def generation_defaults(model_dir: Path) -> dict[str, Any]:
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
                raise ApiError(
                    400,
                    f"content part of type {part.type!r} is not supported: GLM-5.1 reads text parts only",
                    f"messages[{i}].content[{j}].type",
                )
        out["content"] = [{"type": "text", "text": part.text} for part in m.content]
    elif m.content is not None:
        out["content"] = m.content
    for key in ("name", "tool_call_id", "reasoning_content"):
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": tc.id,
                "function": {
                    "name": tc.function.name,
                    "arguments": tc.function.arguments
                    if isinstance(tc.function.arguments, str)
                    else json.dumps(tc.function.arguments, ensure_ascii=False),
                },
            }
            for tc in m.tool_calls
        ]
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
        raise ApiError(
            400, f"tool_choice must be none, auto, required or a named function, got {choice!r}", "tool_choice"
        )
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
            out += (
                _prompts(p)
                if isinstance(p, str | list) and not (isinstance(p, list) and p and isinstance(p[0], list))
                else _bad_prompt()
            )
        return out
    return _bad_prompt()


def _bad_prompt() -> list[dict[str, Any]]:
    raise ApiError(
        400, f"prompt must be a string, a list of token ids, or a list of up to {cp.MAX_CHOICES} of either", "prompt"
    )
