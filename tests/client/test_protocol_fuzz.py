"""Property tests of the protocol decoder: whatever bytes arrive, the only exception is ProtocolError.

Inputs: arbitrary bytes, arbitrary msgpack trees (wide, wrong types, tagged like real messages),
bodies nested thousands of levels deep at any place a message has a value, and well-formed
requests whose values are drawn far outside the allowed ranges. Every input must decode to a
message that meets the protocol's rules or raise a ProtocolError whose Error reply encodes. The
100,000-message run against a live daemon is ops/bench/hostile.py; the examples here are bounded.
"""

from __future__ import annotations

import math
from typing import get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moed.client import protocol as cp
from moed.ops.bench.hostile_messages import wire_fields

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ERROR_CODES = set(get_args(cp.ErrorCode))
TAGS = [
    "generate",
    "abort",
    "heartbeat",
    "health",
    "ready",
    "stats",
    "models",
    "placement",
    "chunk",
    "final",
    "error",
    "pong",
    "batch",
    "launch",
    "",
]
FIELDS = wire_fields()

# Leaves of every msgpack type, ints at the edges of what msgpack holds.
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8)),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))


def msgpack_tree():
    return st.recursive(
        leaves,
        lambda kids: st.one_of(st.lists(kids, max_size=8), st.dictionaries(keys, kids, max_size=8)),
        max_leaves=40,
    )


def tagged_tree():
    """Maps that look like messages: a known or unknown tag, real field names, values of any type."""
    return st.builds(
        lambda tag, rest: {"type": tag, **rest},
        st.sampled_from(TAGS),
        st.dictionaries(keys, msgpack_tree(), max_size=6),
    )


@st.composite
def deep_body(draw) -> bytes:
    """A body nested `depth` levels deep (arrays, maps or both) at one of the places a message has a value."""
    depth = draw(st.integers(200, 20000))
    kind = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\x91\x81\xa1k"]))
    value = kind * (depth // len(kind)) + b"\xc0"
    where = draw(
        st.sampled_from(
            [
                "prompt",
                "messages",
                "ids",
                "unknown",
                "before_tag",
                "id",
                "sampling",
                "top",
                "tools",
                "chat_template_kwargs",
            ]
        )
    )
    enc = msgspec.msgpack.encode
    if where == "top":
        return value
    if where == "before_tag":  # the union's tag comes after the deep value: msgspec must skip it to find the tag
        return b"\x82" + enc("prompt") + value + enc("type") + enc("generate")
    tag = {"ids": "heartbeat"}.get(where, "generate")
    return b"\x83" + enc("type") + enc(tag) + enc("id") + enc("x") + enc(where) + value


numbers = st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def out_of_range_request(draw) -> dict:
    """A Generate (or another request) with the right field names and values drawn far beyond their ranges."""
    tag = draw(st.sampled_from(["generate"] * 6 + ["abort", "heartbeat", "health", "placement"]))
    msg: dict = {"type": tag, "id": draw(st.one_of(st.text(max_size=300), st.integers(-(2**63), 2**64 - 1)))}
    if tag == "generate":
        which = draw(st.sampled_from(["prompt", "prompt_token_ids", "messages", "two", "none"]))
        if which in ("prompt", "two"):
            msg["prompt"] = draw(st.text(max_size=50))
        if which in ("prompt_token_ids", "two"):
            msg["prompt_token_ids"] = draw(st.lists(st.integers(-(2**63), 2**64 - 1), max_size=20))
        if which == "messages":
            content = st.one_of(
                st.none(),
                st.text(max_size=20),
                st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}
                    ),
                    max_size=3,
                ),
            )
            msg["messages"] = draw(
                st.lists(st.fixed_dictionaries({"role": st.text(max_size=8), "content": content}), max_size=3)
            )
            if draw(st.booleans()):
                msg["tools"] = draw(
                    st.lists(
                        st.fixed_dictionaries(
                            {
                                "function": st.fixed_dictionaries(
                                    {"name": st.text(max_size=8), "parameters": msgpack_tree()}
                                )
                            }
                        ),
                        max_size=2,
                    )
                )
            if draw(st.booleans()):
                msg["chat_template_kwargs"] = draw(st.dictionaries(st.text(max_size=16), msgpack_tree(), max_size=3))
        if draw(st.booleans()):
            msg["n"] = draw(numbers)
        msg["sampling"] = draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "temperature",
                        "top_k",
                        "top_p",
                        "min_p",
                        "repetition_penalty",
                        "frequency_penalty",
                        "presence_penalty",
                        "seed",
                        "max_tokens",
                        "logprobs",
                        "stop_token_ids",
                    ]
                ),
                st.one_of(st.none(), numbers),
                max_size=5,
            )
        )
        if draw(st.booleans()):
            msg["deadline_s"] = draw(numbers)
    elif tag == "heartbeat":
        msg = {"type": tag, "ids": draw(st.lists(st.text(max_size=300), max_size=10))}
    elif tag == "placement":
        msg.update(
            op=draw(st.sampled_from(["get", "pin", "unpin", "reset", "move"])),
            layer=draw(numbers),
            expert=draw(numbers),
        )
    return msg


def decode_or_error(decode, body: bytes):
    """The decoded message, or the ProtocolError (checked to make a sendable Error reply)."""
    try:
        return decode(body)
    except cp.ProtocolError as e:
        assert e.code in ERROR_CODES, e.code
        reply = e.to_reply()
        assert cp.decode_reply(cp.encode(reply)[1]) == reply  # the Error goes out whatever the input held
        assert len(reply.id) <= 256
        return e


def check_request(msg: cp.Request) -> None:
    """A decoded request meets the rules the daemon relies on."""
    if hasattr(msg, "id"):
        assert 1 <= len(msg.id) <= 256
    if isinstance(msg, cp.Generate):
        given_ = [x for x in (msg.prompt, msg.prompt_token_ids, msg.messages) if x is not None]
        assert len(given_) == 1 and (msg.prompt is not None or len(given_[0]) > 0)
        assert all(t >= 0 for t in msg.prompt_token_ids or ())
        s = msg.sampling
        assert 0 <= s.temperature <= 100 and 0 < s.top_p <= 1 and 0 <= s.min_p <= 1 and s.top_k >= 0
        assert 0 < s.repetition_penalty <= 100 and -2 <= s.frequency_penalty <= 2 and -2 <= s.presence_penalty <= 2
        assert (s.max_tokens is None or s.max_tokens >= 1) and len(s.stop) <= 16 and len(s.stop_token_ids) <= 64
        assert 1 <= msg.n <= cp.MAX_CHOICES
        assert all(not math.isnan(x) for x in (s.temperature, s.top_p, s.min_p))
        assert msg.deadline_s is None or msg.deadline_s > 0
        msgspec.to_builtins(msg)  # what admission does with tools and template variables (an Ext value raised there)
    if isinstance(msg, cp.Heartbeat):
        assert len(msg.ids) <= 4096


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(body):
    for decode in (cp.decode_request, cp.decode_reply):
        out = decode_or_error(decode, body)
        if decode is cp.decode_request and not isinstance(out, cp.ProtocolError):
            check_request(out)
    try:
        cp.check_header(body)
    except cp.ProtocolError as e:
        assert e.code in ("malformed", "unsupported_version")
    else:
        assert body == cp.HEADER


@FUZZ
@given(st.one_of(msgpack_tree(), tagged_tree()))
def test_arbitrary_msgpack_trees(tree):
    body = msgspec.msgpack.encode(tree)
    out = decode_or_error(cp.decode_request, body)
    if not isinstance(out, cp.ProtocolError):
        check_request(out)
    decode_or_error(cp.decode_reply, body)


@settings(FUZZ, max_examples=60)
@given(deep_body())
def test_deep_nesting_anywhere(body):
    # The defect of issue 15: ~1,000 levels raised RecursionError out of the decoder and killed the frontend.
    for decode in (cp.decode_request, cp.decode_reply):
        out = decode_or_error(decode, body)
        assert isinstance(out, cp.ProtocolError) and out.code in ("malformed", "invalid_request")


@FUZZ
@given(out_of_range_request())
def test_requests_with_out_of_range_values(tree):
    out = decode_or_error(cp.decode_request, msgspec.msgpack.encode(tree))
    if isinstance(out, cp.ProtocolError):
        if out.code == "invalid_request":
            # a refused value is named; an extension value is refused by the decoder's hook, which sees no path
            assert out.field or "extension values" in out.message, out.message
    else:
        check_request(out)


def test_an_extension_value_in_an_any_typed_field_is_refused_at_decoding():
    ext = msgspec.msgpack.Ext(5, b"x")
    for extra in (
        {"tools": [{"function": {"name": "f", "parameters": {"type": ext}}}]},
        {"chat_template_kwargs": {"enable_thinking": ext}},
    ):
        body = msgspec.msgpack.encode(
            {"type": "generate", "id": "r1", "messages": [{"role": "user", "content": "hi"}], **extra}
        )
        with pytest.raises(cp.ProtocolError) as e:
            cp.decode_request(body)
        assert e.value.code == "invalid_request" and e.value.request_id == "r1" and "extension" in e.value.message


def test_a_huge_header_frame_is_refused_without_echoing_it():
    huge = memoryview(b"moed:" + b"9" * (8 << 20))
    with pytest.raises(cp.ProtocolError) as e:
        cp.check_header(huge)
    assert e.value.code == "malformed" and len(e.value.message) < 200 and str(len(huge)) in e.value.message
