"""The OpenAI-compatible HTTP API, with the real `openai` SDK as the client, against a live daemon.

Two daemons: one whose worker double replays a recorded GLM-5.1 output (reasoning, an answer, a tool
call) for every request, so the SDK sees GLM's reasoning split and a parsed tool call through the whole
stack; and one with the real engine on the tiny checkpoint (test_openai_engine.py). Raw HTTP (http.client)
is used where the SDK hides what is tested: status lines, bodies that are not JSON, closed connections.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config, metric_value  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moed.client.api import Client

RECORDED = (
    "The user wants the weather in Beijing, so I should call get_weather.</think>I'll check the weather."
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>days</arg_key>"
    "<arg_value>3</arg_value></tool_call>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]
ASK = [{"role": "user", "content": "Weather in Beijing for 3 days?"}]


def replay_file(model_dir: str, text: str, path: Path) -> Path:
    from moed.daemon.tokenizer import TextTokenizer

    tok = TextTokenizer(model_dir)
    path.write_text(json.dumps([*tok.encode(text, add_special_tokens=False), tok.token_id("<|observation|>")]))
    return path


@pytest.fixture(scope="module")
def replay_daemon(tiny_checkpoint, tmp_path_factory):
    replay = replay_file(tiny_checkpoint, RECORDED, tmp_path_factory.mktemp("replay") / "glm.json")
    cfg = make_config(
        tiny_checkpoint,
        worker=(*DOUBLE, "--double-replay", str(replay)),
        http_address="127.0.0.1:0",
        model_name="tiny",
        max_message_bytes=256 << 10,
        http_max_requests=8,
    )
    with DaemonThread(cfg) as d:
        d.wait_ready(60)
        yield d


def sdk(d: DaemonThread, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{d.daemon.http_port}/v1",
        api_key=kw.pop("api_key", "none"),
        max_retries=0,
        timeout=30,
        **kw,
    )


def raw(
    d: DaemonThread, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.daemon.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def in_flight(d: DaemonThread) -> int:
    return d.call(lambda: len(d.daemon.by_engine_id))


def test_sdk_chat_splits_reasoning_and_parses_the_tool_call(replay_daemon):
    r = sdk(replay_daemon).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants the weather in Beijing, so I should call get_weather."
    assert choice.message.content == "I'll check the weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Beijing", "days": 3}
    assert r.id.startswith("chatcmpl-") and r.model == "tiny" and r.object == "chat.completion"
    assert r.usage.completion_tokens > 30 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sdk_stream_gives_the_same_message_incrementally(replay_daemon):
    whole = sdk(replay_daemon).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS).choices[0].message
    chunks = list(
        sdk(replay_daemon).chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    parts = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    assert parts[0].id and parts[0].function.name == "get_weather" and all(p.index == 0 for p in parts)
    assert len(parts) > 3  # the arguments arrive in pieces, not at the end
    assert "".join(p.function.arguments or "" for p in parts) == whole.tool_calls[0].function.arguments
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 30
    assert all(c.usage is None for c in chunks[:-1])


def test_the_zmq_protocol_gives_the_same_split(replay_daemon):
    with Client(replay_daemon.address, timeout=30) as c:
        done = c.chat(ASK, tools=TOOLS)
        deltas = list(c.chat_stream(ASK, tools=TOOLS))
    assert done.finish_reason == "tool_calls" and done.text == "I'll check the weather."
    assert done.reasoning.startswith("The user wants") and done.tool_calls[0].name == "get_weather"
    assert json.loads(done.tool_calls[0].arguments) == {"city": "Beijing", "days": 3}
    assert "".join(d.reasoning for d in deltas) == done.reasoning and "".join(d.text for d in deltas) == done.text
    with Client(replay_daemon.address, timeout=30) as c:
        many = c.chat(ASK, tools=TOOLS, n=3)
        stream = c.chat_stream(ASK, n=2, max_tokens=4)
        indices = {d.index for d in stream}
    assert [x.index for x in many.choices] == [0, 1, 2] and all(x.tool_calls for x in many.choices)
    assert indices == {0, 1} and [x.finish_reason for x in stream.completion.choices] == ["length", "length"]


def test_n_choices_whole_and_streamed(replay_daemon):
    client = sdk(replay_daemon)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.tool_calls[0].function.arguments for c in r.choices} == {'{"city": "Beijing", "days": 3}'}
    one = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    content: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, n=3, stream=True):
        for c in chunk.choices:
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2} and set(content.values()) == {"I'll check the weather."}


def test_tool_choice_none_and_thinking_off_reach_parser_and_template(replay_daemon):
    client = sdk(replay_daemon)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and "<tool_call>get_weather" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    off = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    # the prompt closed <think>: the model's text is all answer (its stray </think> included)
    assert off.choices[0].message.reasoning_content is None
    assert off.choices[0].message.content.startswith("The user wants") and off.choices[0].message.tool_calls


def test_tool_conversation_and_list_content_are_accepted(replay_daemon):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Beijing", "days": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 C"},
    ]
    r = sdk(replay_daemon).chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError) as e:
        bad = [
            *messages[:2],
            {
                **messages[2],
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}],
            },
        ]
        sdk(replay_daemon).chat.completions.create(model="tiny", messages=bad)
    assert e.value.body["param"] == "messages[2].tool_calls[0].function.arguments"


def test_completions_endpoint_with_logprobs_echo_and_several_prompts(replay_daemon):
    client = sdk(replay_daemon)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and len(lp.tokens) == 5
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert r.choices[0].text == RECORDED[: len(r.choices[0].text)]  # completions are never parsed
    echo = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("Hello")
    ids = replay_daemon.daemon.tokenizer.encode("Hello there", add_special_tokens=False)
    echo_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True)
    assert echo_ids.choices[0].text.startswith("Hello there")
    many = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="tiny", prompt="Hello", max_tokens=5, stream=True)
    )
    assert streamed == r.choices[0].text


def test_models_endpoint(replay_daemon):
    models = sdk(replay_daemon).models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "moed"
    assert sdk(replay_daemon).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        sdk(replay_daemon).models.retrieve("gpt-4")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny", "messages": ASK, "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "messages": ASK, "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "messages": ASK, "n": 0}, 400, "n"),
        ({"model": "tiny", "messages": ASK, "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny"}, 400, "messages"),
        ({"model": "tiny", "messages": "hi"}, 400, "messages"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0].type",
        ),
        ({"model": "tiny", "messages": ASK, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"model": "tiny", "messages": ASK, "tool_choice": "required"}, 400, "tool_choice"),
        ({"model": "tiny", "messages": ASK, "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs"),
        ({"model": "other", "messages": ASK}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_with_the_field(replay_daemon, body, status, param):
    code, _, data = raw(replay_daemon, "POST", "/v1/chat/completions", json.dumps(body).encode())
    err = json.loads(data)["error"]
    assert code == status and err["param"] == param and err["message"] and err["type"], err


def test_sdk_raises_the_matching_exceptions(replay_daemon):
    client = sdk(replay_daemon)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, temperature=7**9)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    with pytest.raises(openai.BadRequestError):  # and in a stream: refused before it starts
        list(client.chat.completions.create(model="tiny", messages=ASK, stream=True, top_p=5))


def test_malformed_bodies_paths_and_sizes(replay_daemon):
    d = replay_daemon
    for body in (b"{", b"[]", b"null", b"\xff\xfe", b'{"messages": [' * 5000 + b"]" * 5000 + b"}"):
        code, _, data = raw(d, "POST", "/v1/chat/completions", body)
        assert code == 400 and json.loads(data)["error"]["message"], body[:20]
    code, _, data = raw(d, "POST", "/v1/chat/completions", b" " * (300 << 10))
    assert code == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    code, _, data = raw(d, "GET", "/v1/chat/completions")
    assert code == 405 and "error" in json.loads(data)
    code, _, data = raw(d, "GET", "/v2/anything")
    assert code == 404 and json.loads(data)["error"]["code"] == "not_found"
    # chunked upload past the limit: answered 413 while it is read (sending more may then fail)
    conn = http.client.HTTPConnection("127.0.0.1", d.daemon.http_port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(64):
            conn.send(b"%x\r\n%s\r\n" % (8192, b"x" * 8192))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass
    assert conn.getresponse().status == 413
    conn.close()
    assert sdk(d).chat.completions.create(model="tiny", messages=ASK).choices[0].finish_reason == "stop"


def _nested(kids: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8), _nested, max_leaves=20
)
FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "stream_options",
    "chat_template_kwargs",
    "prompt",
    "echo",
    "top_k",
    "stop_token_ids",
    "response_format",
]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6), st.booleans(), st.booleans())
def test_fuzzed_requests_get_a_result_or_an_openai_error(replay_daemon, body, chat, valid_messages):
    if valid_messages:
        body = {**body, "messages": ASK} if chat else {**body, "prompt": "hi"}
    body["max_tokens"] = body.get("max_tokens") if not isinstance(body.get("max_tokens"), int) else 3
    path = "/v1/chat/completions" if chat else "/v1/completions"
    code, headers, data = raw(
        replay_daemon, "POST", path, json.dumps(body, allow_nan=False).encode() if _finite(body) else b"{}"
    )
    if code == 200 and headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in data.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        for e in events[:-1]:
            json.loads(e.removeprefix("data: "))
    elif code == 200:
        assert json.loads(data)["choices"] is not None
    else:
        err = json.loads(data)["error"]
        assert code in (400, 404, 413, 429) and err["message"], (code, err)
    assert in_flight(replay_daemon) <= 8


def _finite(x) -> bool:
    if isinstance(x, float):
        return x == x and abs(x) != float("inf")
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    return True


def stream_socket(d: DaemonThread, body: dict) -> socket.socket:
    """A streaming request on a raw socket, its response headers and first event read."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", d.daemon.http_port), timeout=10)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(data), data)
    )
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    return s


def wait_until(d: DaemonThread, predicate, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not d.call(predicate):
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - t0


LONG = {"model": "tiny", "messages": ASK, "max_tokens": 3000, "ignore_eos": True}


def test_closing_the_connection_aborts_streamed_and_whole_requests(replay_daemon):
    d = replay_daemon
    s = stream_socket(d, {**LONG, "stream": True, "n": 2})
    assert in_flight(d) == 2
    s.close()
    assert wait_until(d, lambda: not d.daemon.by_engine_id) < 2
    data = json.dumps(LONG).encode()
    s = socket.create_connection(("127.0.0.1", d.daemon.http_port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
    wait_until(d, lambda: len(d.daemon.by_engine_id) == 1)
    s.close()
    assert wait_until(d, lambda: not d.daemon.by_engine_id) < 2
    assert d.call(lambda: not d.daemon.http.pending)


def test_http_limit_answers_429_and_a_slow_reader_delays_nobody(replay_daemon):
    d = replay_daemon
    held = [stream_socket(d, {**LONG, "stream": True, "n": 4}) for _ in range(2)]  # 8 = http_max_requests
    try:
        with pytest.raises(openai.RateLimitError) as e:
            sdk(d).chat.completions.create(model="tiny", messages=ASK)
        assert e.value.response.headers["retry-after"] == "1"
        # the held streams are not read: their replies merge in the daemon; the ZMQ path still answers at once
        with Client(d.address, timeout=30) as c:
            t0 = time.monotonic()
            assert c.chat(ASK, tools=TOOLS).tool_calls
            assert time.monotonic() - t0 < 5
    finally:
        for s in held:
            s.close()
    wait_until(d, lambda: not d.daemon.by_engine_id)
    assert sdk(d).chat.completions.create(model="tiny", messages=ASK).choices[0].message.content


def test_metrics_carry_model_name_and_count_http_requests(replay_daemon):
    sdk(replay_daemon).models.list()
    code, _, data = raw(replay_daemon, "GET", "/metrics")
    text = data.decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert code == 200 and samples and all('model_name="tiny"' in line for line in samples)
    assert metric_value(text, "moed_http_requests_total", {"route": "/v1/models", "status": "200"}) >= 1
    assert "moed_build_info{" in text and 'version="' in text
    assert metric_value(text, "moed_request_queue_time_seconds_count") >= 1
    assert metric_value(text, "moed_request_decode_time_seconds_count") >= 1
    assert raw(replay_daemon, "GET", "/health")[0] == 200 and raw(replay_daemon, "GET", "/ready")[0] == 200


def test_api_key(tiny_checkpoint):
    cfg = make_config(tiny_checkpoint, http_address="127.0.0.1:0", model_name="tiny", http_api_key="s3cret")
    with DaemonThread(cfg) as d:
        d.wait_ready(60)
        with pytest.raises(openai.AuthenticationError) as e:
            sdk(d, api_key="wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        code, headers, _ = raw(d, "POST", "/v1/completions", b"{}")
        assert code == 401 and headers["www-authenticate"] == "Bearer"
        assert sdk(d, api_key="s3cret").completions.create(model="tiny", prompt="hi", max_tokens=2).usage
        assert raw(d, "GET", "/health")[0] == 200  # probes need no key


def test_not_ready_and_draining_answer_503(tiny_checkpoint):
    cfg = make_config(
        tiny_checkpoint, worker=(*DOUBLE, "--double-load-s", "30"), http_address="127.0.0.1:0", model_name="tiny"
    )
    with DaemonThread(cfg) as d:
        with pytest.raises(openai.InternalServerError) as e:
            sdk(d).chat.completions.create(model="tiny", messages=ASK)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert raw(d, "GET", "/ready")[0] == 503


def test_many_concurrent_streams_each_get_their_own(replay_daemon):
    results: dict[int, str] = {}

    def one(i: int) -> None:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in sdk(replay_daemon).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"q{i}"}], stream=True, max_tokens=500
            )
            if c.choices
        )
        results[i] = text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (
        set(results.values())
        == {
            "I'll check the weather.<tool_call>get_weather<arg_key>city</arg_key>"
            "<arg_value>Beijing</arg_value><arg_key>days</arg_key><arg_value>3</arg_value>"
            "</tool_call>"
        }
        and len(results) == 8
    )
