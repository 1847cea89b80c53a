"""The daemon with the real CPU engine worker (`python -m moed.engine.worker`) on the tiny checkpoint.

Oracle for token ids: the same engine (LLMEngine, checked against transformers in test_parity_hf.py) run in
this process (fp32 on CPU, like the worker), the prompts of a test together (its outputs do not depend on
what else is batched: test_engine_batching.py). A daemon that mixed up streams, dropped or duplicated tokens,
or mangled text would disagree with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from daemon_harness import (  # noqa: F401
    HAVE_REAL_WORKER,
    NO_REAL_WORKER,
    REAL_WORKER,
    DaemonThread,
    hang_guard,
    make_config,
    metric_value,
    scrape,
)

from moed.client.api import AsyncClient, Client, MoedError

pytestmark = pytest.mark.skipif(not HAVE_REAL_WORKER, reason=NO_REAL_WORKER)


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    from moed.engine.llm_engine import EngineConfig, LLMEngine
    from moed.engine.protocol import SamplingParams

    engine = LLMEngine(EngineConfig(model=tiny_checkpoint, device="cpu", dtype="fp32"))

    def greedy(ids: list[int] | list[list[int]], n: int) -> list[int] | list[list[int]]:
        """The greedy continuation of one prompt, or of each of a list of prompts."""
        one = bool(ids) and isinstance(ids[0], int)
        out = engine.generate([ids] if one else ids, SamplingParams(max_tokens=n, ignore_eos=True))
        return out[0] if one else out

    return greedy


@pytest.fixture(scope="module")
def engine_daemon(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=REAL_WORKER, stats_interval_s=0.1, max_running=128)) as d:
        d.wait_ready(120)
        yield d


def test_engine_stream_matches_single_sequence_greedy(engine_daemon, oracle):
    tok = engine_daemon.daemon.tokenizer
    prompt = "Grüße aus München, 你好 🙂 and"
    with Client(engine_daemon.address, timeout=60) as c:
        s = c.stream(prompt, max_tokens=24, ignore_eos=True)
        deltas = list(s)
        comp = s.completion
    assert comp.token_ids == oracle(tok.encode(prompt), 24)
    assert comp.text == "".join(d.text for d in deltas) == tok.decode(comp.token_ids)
    assert comp.finish_reason == "length" and comp.completion_tokens == 24 and len(deltas) >= 12


async def test_engine_100_concurrent_streams_each_get_their_own_tokens(engine_daemon, oracle):
    tok = engine_daemon.daemon.tokenizer
    prompts = [
        f"{i} " + " ".join(["expert", "cache", "token", "layer", "route"][j % 5] for j in range(i % 9 + 1))
        for i in range(100)
    ]
    client = AsyncClient(engine_daemon.address, timeout=120)

    async def one(p: str):
        s = await client.stream(p, max_tokens=6, ignore_eos=True)
        deltas = [d async for d in s]
        return s.completion, deltas

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)
    finally:
        await client.close()
    expected = oracle([tok.encode(p) for p in prompts], 6)
    for p, want, (comp, deltas) in zip(prompts, expected, results):
        assert comp.token_ids == want, p
        assert comp.text == "".join(d.text for d in deltas) == tok.decode(comp.token_ids)


def test_engine_abort_and_stop_string(engine_daemon, oracle):
    d = engine_daemon
    with Client(d.address, timeout=60) as c:
        it = iter(c.stream("abort this one", max_tokens=2000, ignore_eos=True))
        next(it), next(it)
        it.close()
        d.wait_for(lambda: not d.daemon.by_engine_id, 5, "aborted in the daemon")
        d.wait_for(
            lambda: (
                d.daemon.last_stats is not None
                and d.daemon.last_stats.running == 0
                and d.daemon.last_stats.kv_usage == 0
                and time.monotonic() - d.daemon.last_stats_at < 0.15
            ),
            10,
            "engine freed the request and its KV pages",
        )
        # A stop string taken from the greedy text itself, spanning tokens: the text ends right before it.
        free = c.generate("The quick brown fox", max_tokens=40, ignore_eos=True)
        stop = free.text[12:16]
        assert len(stop) == 4
        cut = c.generate("The quick brown fox", max_tokens=40, ignore_eos=True, stop=stop)
        i = free.text.find(stop)
        assert cut.finish_reason == "stop" and cut.stop == stop and cut.text == free.text[:i]
        assert cut.token_ids == free.token_ids[: cut.completion_tokens] and cut.completion_tokens < 40
    d.wait_for(
        lambda: d.daemon.last_stats.running == 0 and time.monotonic() - d.daemon.last_stats_at < 0.15,
        10,
        "engine dropped the stopped request",
    )


def test_engine_metrics_and_placement(engine_daemon):
    with Client(engine_daemon.address, timeout=60) as c:
        c.generate("count me", max_tokens=5, ignore_eos=True)
        r = c.placement("get")  # forwarded to the engine, which has no expert cache with --moe torch
        assert not r.ok and "not available" in r.message
    _, text = scrape(engine_daemon.metrics_url + "/metrics")
    assert metric_value(text, "moed_step_duration_seconds_count") > 0
    assert metric_value(text, "moed_generation_tokens_total") >= 5
    assert metric_value(text, "moed_kv_cache_usage_ratio") is not None
    assert metric_value(text, "moed_ready") == 1


def test_engine_worker_killed_then_recovers_and_drains(tiny_checkpoint, oracle):
    # The drain must let in-flight requests finish: give it the time a loaded 2-core CI machine needs for 3 x 30
    # tokens (harness default 5 s: on a machine at load 7-10 the streams were aborted, on main as well).
    with DaemonThread(make_config(tiny_checkpoint, worker=REAL_WORKER, drain_timeout_s=60.0)) as d:
        d.wait_ready(120)
        tok = d.daemon.tokenizer
        c = Client(d.address, timeout=120)
        try:
            streams = [iter(c.stream(f"victim {i}", max_tokens=2000, ignore_eos=True)) for i in range(3)]
            for s in streams:
                next(s)
            os.kill(d.daemon.supervisor.pid, signal.SIGKILL)
            for s in streams:
                with pytest.raises(MoedError) as e:
                    for _ in s:
                        pass
                assert e.value.code == "engine_error"
            d.wait_ready(120)
            r = c.generate("after the crash", max_tokens=8, ignore_eos=True)
            assert r.token_ids == oracle(tok.encode("after the crash"), 8)
            # Drain: in-flight requests finish, new ones are refused, the worker exits.
            streams = [c.stream(f"drain {i}", max_tokens=30, ignore_eos=True) for i in range(3)]
            its = [iter(s) for s in streams]
            for it in its:
                next(it)
            d.loop.call_soon_threadsafe(d.daemon.request_drain)
            for it in its:
                for _ in it:
                    pass
            expected = oracle([tok.encode(f"drain {i}") for i in range(3)], 30)
            for s, want in zip(streams, expected):
                assert s.completion.finish_reason == "length"
                assert s.completion.token_ids == want
            d.thread.join(30)
            assert not d.thread.is_alive()
        finally:
            c.close()
