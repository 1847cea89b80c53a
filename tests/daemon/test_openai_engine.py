"""The HTTP API with the real engine worker on the tiny checkpoint, the openai SDK as the client.

Oracle: the same request over the ZMQ protocol (moed's client) and the single-sequence greedy path
(moed.engine.generate) in this process. HTTP whole, HTTP streamed and ZMQ must give the same tokens.
"""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
from daemon_harness import HAVE_REAL_WORKER, NO_REAL_WORKER, REAL_WORKER, DaemonThread, hang_guard, make_config  # noqa: F401

from moed.client.api import Client

pytestmark = pytest.mark.skipif(not HAVE_REAL_WORKER, reason=NO_REAL_WORKER)
OFF = {"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    cfg = make_config(
        tiny_checkpoint, worker=REAL_WORKER, http_address="127.0.0.1:0", model_name="tiny", max_running=16
    )
    with DaemonThread(cfg) as d:
        d.wait_ready(120)
        yield d


def sdk(d: DaemonThread) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{d.daemon.http_port}/v1", api_key="none", max_retries=0, timeout=60
    )


def test_whole_streamed_and_zmq_agree_token_for_token(engine):
    messages = [{"role": "user", "content": "Grüße aus München, 你好"}]
    client = sdk(engine)
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2, extra_body=OFF
    )
    choice = whole.choices[0]
    ids = choice.model_extra["token_ids"]
    assert len(ids) == 12 and choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    lps = choice.logprobs.content
    assert [len(t.top_logprobs) for t in lps] == [2] * 12 and all(t.logprob <= 0 for t in lps)
    assert all(bytes(t.bytes).decode("utf-8", errors="replace") == t.token for t in lps)
    streamed_ids, content = [], ""
    for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True, extra_body=OFF
    ):
        if chunk.choices:
            streamed_ids += chunk.choices[0].model_extra.get("token_ids") or []
            content += chunk.choices[0].delta.content or ""
    with Client(engine.address, timeout=60) as c:
        zmq = c.chat(messages, max_tokens=12, ignore_eos=True, chat_template_kwargs={"enable_thinking": False})
    assert streamed_ids == ids == zmq.token_ids
    assert content == (choice.message.content or "") == zmq.text
    # the prompt is the chat template's: the daemon's own rendering of the same messages
    tok = engine.daemon.tokenizer
    assert whole.usage.prompt_tokens == len(tok.encode_chat(messages, True, None, {"enable_thinking": False}))


def test_completions_match_the_engine_in_process(engine):
    from moed.engine.llm_engine import EngineConfig, LLMEngine
    from moed.engine.protocol import SamplingParams

    prompt_ids = engine.daemon.tokenizer.encode("The expert cache keeps", add_special_tokens=False)
    r = sdk(engine).completions.create(
        model="tiny",
        prompt=prompt_ids,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    oracle = LLMEngine(EngineConfig(model=engine.cfg.model, device="cpu", dtype="fp32"))
    [want] = oracle.generate([prompt_ids], SamplingParams(max_tokens=8, ignore_eos=True))
    assert r.choices[0].model_extra["token_ids"] == want


def test_seeded_choices_are_reproducible_and_stop_strings_cut(engine):
    client = sdk(engine)
    kw = dict(
        model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True}
    )
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    greedy = (
        client.completions.create(
            model="tiny", prompt="Hello", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = greedy[3:6] if len(greedy.strip()) > 6 else None
    if stop:
        cut = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=10, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
        ).choices[0]
        assert cut.finish_reason == "stop" and cut.text == greedy[: greedy.index(stop)]


def test_a_closed_connection_frees_the_engine(engine):
    body = json.dumps(
        {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    ).encode()
    s = socket.create_connection(("127.0.0.1", engine.daemon.http_port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    s.close()
    t0 = time.monotonic()
    while engine.call(lambda: len(engine.daemon.by_engine_id)):
        assert time.monotonic() - t0 < 5
        time.sleep(0.02)
    r = sdk(engine).completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
