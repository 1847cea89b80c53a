"""The asyncio client: streams, cancellation aborts, dead daemons, and Curve keys (both clients)."""

from __future__ import annotations

import asyncio
import time

import pytest
from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config  # noqa: F401

from moed.client.api import AsyncClient, AuthenticationError, Client, DaemonUnavailable, MoedError, curve_keys, keygen

SLOW = (*DOUBLE, "--double-step-s", "0.02")


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=SLOW)) as d:
        d.wait_ready(30)
        yield d


async def test_async_generate_stream_and_info(daemon):
    tok = daemon.daemon.tokenizer
    async with AsyncClient(daemon.address, timeout=20) as c:
        r = await c.generate("héllo", max_tokens=5)
        ids = tok.encode("héllo")
        assert r.token_ids == [ids[i % len(ids)] for i in range(5)] and r.finish_reason == "length"
        s = await c.chat_stream([{"role": "user", "content": "yo"}], max_tokens=4, ignore_eos=True)
        deltas = [d async for d in s]
        assert s.completion.completion_tokens == 4 and "".join(d.text for d in deltas) == s.completion.text
        assert (await c.ready()).ready and (await c.health()).ok
        assert (await c.models())[0].vocab_size == 1024
        with pytest.raises(MoedError) as e:
            await c.generate("x", max_tokens=2, model="other")
        assert e.value.field == "model"


async def test_cancellation_aborts(daemon):
    async with AsyncClient(daemon.address, timeout=30) as c:
        task = asyncio.create_task(c.generate("cancel me", max_tokens=3000))
        await asyncio.sleep(0.2)
        assert len(daemon.call(lambda: list(daemon.daemon.by_engine_id))) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(daemon.wait_for, lambda: not daemon.daemon.by_engine_id, 5, "aborted on cancel")

        async def consume():
            s = await c.stream("cancel my stream", max_tokens=3000)
            async for _ in s:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(daemon.wait_for, lambda: not daemon.daemon.by_engine_id, 5, "stream aborted")
        # Leaving an async for early aborts too.
        s = await c.stream("leave early", max_tokens=3000)
        async with s:
            async for _ in s:
                break
        await asyncio.to_thread(daemon.wait_for, lambda: not daemon.daemon.by_engine_id, 5, "left early")
        assert (await c.generate("ok", max_tokens=2)).completion_tokens == 2


async def test_async_dead_daemon_raises():
    async with AsyncClient("tcp://127.0.0.1:9", timeout=30, heartbeat_interval=0.1, daemon_timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            await c.generate("anyone?", max_tokens=2)
        assert time.monotonic() - t0 < 2


def test_curve_accepts_listed_key_and_refuses_another(tiny_checkpoint, tmp_path):
    _, server_secret = keygen(tmp_path / "server", "daemon")
    _, allowed_secret = keygen(tmp_path / "allowed", "alice")
    _, other_secret = keygen(tmp_path / "other", "mallory")
    cfg = make_config(
        tiny_checkpoint,
        worker=DOUBLE,
        curve_secret_key=str(server_secret),
        curve_allowed_clients=str(tmp_path / "allowed"),
    )
    with DaemonThread(cfg) as d:
        d.wait_ready(30)
        server_pub = tmp_path / "server" / "daemon.key"
        with Client(d.address, timeout=20, curve=curve_keys(server_pub, allowed_secret)) as c:
            assert c.generate("secret hello", max_tokens=3).completion_tokens == 3
        t0 = time.monotonic()
        with (
            Client(d.address, timeout=20, curve=curve_keys(server_pub, other_secret)) as c,
            pytest.raises(AuthenticationError, match="refused"),
        ):
            c.generate("let me in", max_tokens=3)
        assert time.monotonic() - t0 < 5  # refused in the handshake, reported at once
        assert d.daemon.allow_list.denied >= 1

        async def async_refused():
            async with AsyncClient(d.address, timeout=20, curve=curve_keys(server_pub, other_secret)) as ac:
                with pytest.raises(AuthenticationError):
                    await ac.generate("let me in", max_tokens=3)
            async with AsyncClient(d.address, timeout=20, curve=curve_keys(server_pub, allowed_secret)) as ac:
                assert (await ac.generate("ok", max_tokens=2)).completion_tokens == 2

        asyncio.run(async_refused())
        # Without Curve the client never gets through either (no reply; the client gives up on the daemon).
        with (
            Client(d.address, timeout=20, heartbeat_interval=0.1, daemon_timeout=0.5) as c,
            pytest.raises(DaemonUnavailable),
        ):
            c.generate("plain", max_tokens=2)
        assert d.daemon.by_engine_id == {}
