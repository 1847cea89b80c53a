"""The HTTP API's added latency per token against the ZMQ path, 1 to 256 concurrent streams.

    python -m moed.ops.bench.http_api [--model builtin:tiny] [--device cpu] \
        [--concurrency 1,8,32,64,128,256] [--max-tokens 32] [--out http.json]

One daemon (this process, its own event loop) serves the real engine worker over both front ends at
once: ZMQ (ipc, moed's asyncio client, as ops/bench/serve.py) and the OpenAI-compatible HTTP API (TCP on
localhost, POST /v1/completions streamed as server-sent events with `return_token_ids`, read by a minimal
asyncio HTTP/1.1 client so the figures are the server's, not an SDK's). At each concurrency the two
protocols run one after the other with the same prompts, greedy, ignore_eos, so the engine does the same
work. Every token gets two CLOCK_MONOTONIC stamps: when the engine's StepOutputs frame carrying it reached
the daemon, and when the load generator process had the bytes carrying it. Their difference is the
latency the front end (daemon dispatch, encoding, the socket hop, the client's own loop) adds to a token.
Printed per level and protocol: that latency's p50 / p99 / mean, p50 as a fraction of the engine step
(median step time reported by the worker in the same run: the ceiling), CPU time per token received of
the daemon process while the streams run (all its threads: front ends, dispatch, detokenising; the
worker is another process), and tokens/s received against tokens / (sum of step times). The last column
is HTTP's p50 minus ZMQ's at the same level. Load generators, daemon and worker share this machine's
cores, so on a small CPU their contention is in every figure. --out writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from moed.engine.config import add_engine_arguments
from moed.ops.bench.serve import RecordingDaemon, _load_process, _per_token, _quantile, ready_daemon, run_bench

log = logging.getLogger("bench.http")


async def _http_stream(port: int, prompt: str, max_tokens: int) -> tuple[str, list[tuple[float, int]]]:
    """One streamed completion: (response id, [(monotonic time the bytes arrived, tokens in them)])."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
            "return_token_ids": True,
        }
    ).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"HTTP API answered {head.splitlines()[0]!r}: {await reader.read(2000)!r}")
    rid, stamps, buf = "", [], b""
    while True:  # chunked transfer encoding, server-sent events inside
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        t = time.monotonic()
        buf += data[:-2]
        *events, buf = buf.split(b"\n\n")
        for event in events:
            if event == b"data: [DONE]":
                continue
            obj = json.loads(event[6:])
            rid = obj["id"]
            n = sum(len(c.get("token_ids") or ()) for c in obj["choices"])
            if n:
                stamps.append((t, n))
    writer.close()
    return rid, stamps


def _http_load_process(port: int, prompts: list[str], max_tokens: int, start_at: float, conn) -> None:
    async def run():
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return await asyncio.gather(*(_http_stream(port, p, max_tokens) for p in prompts))

    try:
        import uvloop

        result = uvloop.run(run())
    except ImportError:
        result = asyncio.run(run())
    conn.send(result)
    conn.close()


async def _measure(daemon: RecordingDaemon, protocol: str, target: tuple, n: int, max_tokens: int, procs: int) -> dict:
    prompts = [f"stream {i}: the expert cache keeps layer {i % 75} warm" for i in range(n)]
    groups = [prompts[i::procs] for i in range(procs)]
    ctx = mp.get_context("spawn")
    start_at = time.monotonic() + 1.5  # spawned interpreters need a moment to import
    pipes, workers = [], []
    fn, address = target
    for g in groups:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=fn, args=(address, g, max_tokens, start_at, child), daemon=True)
        p.start()
        pipes.append(parent)
        workers.append(p)
    daemon.reset()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = _cpu(resource.getrusage(resource.RUSAGE_SELF))
    receiving = [loop.run_in_executor(None, parent.recv) for parent in pipes]
    results = []
    for got in receiving:
        results += await got
    cpu1 = _cpu(resource.getrusage(resource.RUSAGE_SELF))  # before the joins: the streams are done
    for p in workers:
        await loop.run_in_executor(None, p.join, 30)
    t_end = max(stamps[-1][0] for _, stamps in results)
    latencies, mismatched, total = [], 0, 0
    for rid, stamps in results:
        got = _per_token(stamps)
        sent = _per_token(daemon.arrivals.get(daemon.engine_ids.get(rid, ""), []))
        total += len(got)
        if len(got) != len(sent):
            mismatched += 1
            continue
        latencies += [g - s for g, s in zip(got, sent)]
    steps = daemon.step_times
    return {
        "protocol": protocol,
        "streams": n,
        "tokens": total,
        "requests_with_unmatched_tokens": mismatched,
        "engine_step_median_s": statistics.median(steps),
        "added_latency_p50_s": _quantile(latencies, 0.5),
        "added_latency_p99_s": _quantile(latencies, 0.99),
        "added_latency_mean_s": statistics.fmean(latencies),
        "added_latency_p50_over_step": _quantile(latencies, 0.5) / statistics.median(steps),
        "daemon_wall_per_token_s": daemon.dispatch_s / max(1, daemon.dispatch_tokens),
        # CPU of this process while the streams ran (the daemon: both front ends, dispatch, detokenising; the
        # worker is another process) per token received
        "daemon_cpu_per_token_s": (cpu1 - cpu0) / max(1, total),
        "client_tokens_per_s": total / (t_end - start_at),
        "throughput_over_engine_bound": (total / (t_end - start_at)) / (total / sum(steps)),
    }


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


async def _bench(args: argparse.Namespace, model_dir: str, runtime: str) -> dict:
    levels = [int(x) for x in args.concurrency.split(",")]
    address = f"ipc://{runtime}/bench.sock"
    async with ready_daemon(
        args, model_dir, runtime, levels, http_address="127.0.0.1:0", http_max_requests=max(levels) + 8
    ) as daemon:
        targets = {"zmq": (_load_process, address), "http": (_http_load_process, daemon.http_port)}
        log.info("warm-up")
        for protocol, target in targets.items():
            await _measure(daemon, protocol, target, min(8, max(levels)), 8, 1)
        rows = []
        for n in levels:
            procs = 1 if n <= 64 else 2
            for protocol, target in targets.items():
                row = await _measure(daemon, protocol, target, n, args.max_tokens, procs)
                log.info("%d streams over %s: %s", n, protocol, row)
                rows.append(row)
        return {
            "model": model_dir,
            "device": args.device,
            "max_tokens": args.max_tokens,
            "cpus": os.cpu_count(),
            "rows": rows,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.http_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny", help="checkpoint directory or builtin:tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", default="1,8,32,64,128,256")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per stream")
    p.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads of the worker (OMP_NUM_THREADS), so the daemon and load generators keep "
        "a core on a small CPU; 0 = torch's default",
    )
    p.add_argument("--out", help="write the figures here as JSON")
    add_engine_arguments(
        p.add_argument_group("engine settings (moed.engine.config)"), exclude=("device", "max_running")
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir, result = run_bench(_bench, args, "moedh")
    print(
        f"\nHTTP vs ZMQ: {Path(model_dir).name} on {args.device}, {args.max_tokens} tokens per stream, "
        f"{result['cpus']} CPUs shared by daemon, worker and load generators"
    )
    print("latency per token, ms: engine frame received by the daemon -> the load generator has the token")
    print(
        f"{'streams':>7} {'proto':>5} {'tokens':>7} {'step ms':>8} {'p50':>7} {'p99':>7} {'mean':>7} "
        f"{'p50/step':>8} {'cpu us/tok':>10} {'tok/s':>7} {'ratio':>6} {'http-zmq p50':>12}"
    )
    zmq_p50 = {}
    for r in result["rows"]:
        if r["protocol"] == "zmq":
            zmq_p50[r["streams"]] = r["added_latency_p50_s"]
        diff = (
            f"{(r['added_latency_p50_s'] - zmq_p50[r['streams']]) * 1e3:>12.3f}"
            if r["protocol"] == "http" and r["streams"] in zmq_p50
            else f"{'':>12}"
        )
        print(
            f"{r['streams']:>7} {r['protocol']:>5} {r['tokens']:>7} {r['engine_step_median_s'] * 1e3:>8.2f} "
            f"{r['added_latency_p50_s'] * 1e3:>7.3f} {r['added_latency_p99_s'] * 1e3:>7.3f} "
            f"{r['added_latency_mean_s'] * 1e3:>7.3f} {r['added_latency_p50_over_step']:>8.3f} "
            f"{r['daemon_cpu_per_token_s'] * 1e6:>10.1f} {r['client_tokens_per_s']:>7.0f} "
            f"{r['throughput_over_engine_bound']:>6.2f} {diff}"
            + (f"  ({r['requests_with_unmatched_tokens']} unmatched)" if r["requests_with_unmatched_tokens"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
