"""The hostile-client benchmark's load processes (`--role`): live streams, maximum-size prompts and the fuzzer,
each in a child process so that its Python work never competes with the daemon's GIL; each prints its JSON
result as stdout's last line."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

import msgspec

from moed.ops.bench.hostile_fuzz import fuzz


def run_async(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def filler_text(chars: int, seed: int = 0) -> str:
    """Plain words and numbers, the same for the same arguments in every process (64 KiB of them, repeated)."""
    rng = random.Random(seed)
    words = ["the", "expert", "cache", "keeps", "every", "layer", "warm", "while", "host", "computes", "misses"]
    block = " ".join(f"{rng.choice(words)}{rng.randint(0, 99)}" for _ in range(8192))[: 1 << 16] + " "
    return (block * (chars // len(block) + 1))[:chars]


async def _role_streams(address: str, n: int, max_tokens: int) -> dict:
    """`n` concurrent streams, each restarted when it ends, until stdin closes: chunk stamps and failures.
    Prints "ready" once every stream has completed one round."""
    from moed.client.api import AsyncClient

    stamps: list[float] = []
    failures: list[str] = []
    done = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1024) else None)

    async with AsyncClient(address, timeout=600) as client:

        async def one(i: int) -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    s = await client.stream(
                        f"stream {i}: the experts stay warm", max_tokens=max_tokens, ignore_eos=True
                    )
                    tokens = 0
                    async for d in s:
                        stamps.append(time.monotonic())
                        tokens += len(d.token_ids)
                    if tokens != max_tokens or s.completion.finish_reason != "length":
                        failures.append(f"stream {i}: {tokens} tokens, {s.completion.finish_reason}")
                    done += 1
                    if done == n:
                        print("ready", flush=True)
                except Exception as e:
                    failures.append(f"stream {i}: {type(e).__name__}: {e}")
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(one(i) for i in range(n)))
    return {"stamps": stamps, "done": done, "failures": failures}


async def _role_prompts(address: str, specs: list[tuple[int, int]], together: bool) -> dict:
    """Prompts of filler text, (characters, max_tokens) each: in turn, or all at once from a client each."""
    from moed.client.api import AsyncClient, MoedError

    texts = {chars: filler_text(chars) for chars, _ in specs}  # built first: a busy client looks like a deaf daemon

    async def one(client: AsyncClient, chars: int, max_tokens: int) -> list:
        text = texts[chars]
        t0 = time.monotonic()
        try:
            c = await client.generate(text, max_tokens=max_tokens)
            what = f"admitted ({c.prompt_tokens} prompt tokens)"
        except MoedError as e:
            what = f"{e.code}: {e.message[:100]}"
        return [t0, time.monotonic(), len(text.encode()), what]

    if together:

        async def alone(chars: int, max_tokens: int) -> list:
            async with AsyncClient(address, timeout=600) as client:
                return await one(client, chars, max_tokens)

        return {"results": await asyncio.gather(*(alone(c, m) for c, m in specs))}
    async with AsyncClient(address, timeout=600) as client:
        return {"results": [await one(client, c, m) for c, m in specs]}


async def start_role(*role_args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "moed.ops.bench.hostile",
        "--role",
        *role_args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def role_result(proc: asyncio.subprocess.Process, timeout: float) -> dict:
    """A child's JSON result (its last line), waited for without blocking the daemon's loop."""
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load process exited {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


def role_main(role_args: list[str]) -> int:
    """Run one load process (`--role NAME ARGS...`) and print its result."""
    role, rest = role_args[0], role_args[1:]
    if role == "streams":
        result = run_async(_role_streams(rest[0], int(rest[1]), int(rest[2])))
    elif role in ("prompts", "together"):
        specs = json.loads(rest[1])
        result = run_async(_role_prompts(rest[0], [tuple(x) for x in specs], role == "together"))
    elif role == "fuzz":
        tally = run_async(fuzz(rest[0], int(rest[1]), int(rest[2]), int(rest[3])))
        result = msgspec.to_builtins(tally)
    else:
        raise SystemExit(f"unknown role {role!r}")
    print(json.dumps(result), flush=True)
    return 0
