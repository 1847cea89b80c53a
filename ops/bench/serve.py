"""Serving benchmark: the daemon's added latency per token, against the engine's own step time.

    python -m moed.ops.bench.serve [--model builtin:tiny] [--device cpu] \
        [--concurrency 1,8,32,64,128,256] [--max-tokens 32] [--out serve.json]

Runs the real daemon (this process, its own asyncio loop) with the real engine worker, and load
generator processes that open N concurrent streams over ZMQ ipc with the asyncio client. For every
generated token it takes two CLOCK_MONOTONIC stamps (one clock for all processes of a host): when
the engine's StepOutputs frame carrying it reached the daemon, and when the client process had it
as a Delta. Their difference is the latency the daemon (and the ZMQ hop, and the client's own loop)
adds to a token on its way from engine to client. Figures per concurrency:
  engine step     median and mean `step_time_s` the worker reported for the steps of this run
                  (the ceiling the daemon is compared with);
  added latency   p50 / p99 / mean per token, and p50 as a fraction of the engine step;
  daemon per token  time handling engine output frames (detokenise, stop strings, encode, send) per
                  token: wall time, and CPU time of the daemon's thread (wall minus time preempted);
  throughput      tokens/s the clients received against tokens / (sum of engine step times): 1.0
                  means the engine alone bounds throughput.
Also printed: the idle round trip of a Health request (client -> daemon -> client), the transport floor.
The load generators, the daemon and the worker share this machine's cores, so on a small CPU their
contention is part of every figure. Prints a table last; --out writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from moed.daemon.config import ServeConfig
from moed.daemon.server import Daemon
from moed.daemon.service import resolve_model
from moed.engine.config import ENGINE_SETTINGS, add_engine_arguments

log = logging.getLogger("bench.serve")


class RecordingDaemon(Daemon):
    """The daemon, stamping each engine output frame's arrival and timing its handling."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        self.arrivals: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)  # engine id -> (t, n)
        self.step_times: list[float] = []
        self.frames: list[tuple[float, int]] = []  # (arrival -> every reply handed to ZMQ, tokens in the frame)
        self.dispatch_s = 0.0  # wall time handling frames
        self.dispatch_cpu_s = 0.0  # CPU time of the daemon's thread doing it (without time preempted)
        self.dispatch_tokens = 0
        self.engine_ids: dict[str, str] = {}  # client request id -> engine id

    def _on_step(self, msg, generation):
        t = time.monotonic()
        t0, c0 = time.perf_counter(), time.thread_time()
        super()._on_step(msg, generation)
        dt = time.perf_counter() - t0
        self.dispatch_s += dt
        self.dispatch_cpu_s += time.thread_time() - c0
        self.step_times.append(msg.step_time_s)
        n = 0
        for out in msg.outputs:
            if out.new_token_ids:
                self.arrivals[out.request_id].append((t, len(out.new_token_ids)))
                n += len(out.new_token_ids)
        self.dispatch_tokens += n
        self.frames.append((dt, n))

    def _start(self, client, msg, *args):
        super()._start(client, msg, *args)
        self.engine_ids[msg.id] = client.requests[msg.id][0].engine_id


def _load_process(address: str, prompts: list[str], max_tokens: int, start_at: float, conn) -> None:
    """One load generator: all its streams at once; sends back (request id, [(t, tokens)]) per stream."""
    from moed.client.api import AsyncClient

    async def run():
        client = AsyncClient(address, timeout=900)

        async def one(prompt: str):
            s = await client.stream(prompt, max_tokens=max_tokens, ignore_eos=True)
            stamps = [(time.monotonic(), len(d.token_ids)) async for d in s if d.token_ids]
            return s.id, stamps

        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    try:
        import uvloop

        result = uvloop.run(run())
    except ImportError:
        result = asyncio.run(run())
    conn.send(result)
    conn.close()


def _per_token(stamps: list[tuple[float, int]]) -> list[float]:
    return [t for t, n in stamps for _ in range(n)]


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _round_trip(address: str, n: int = 200) -> float:
    from moed.client.api import AsyncClient

    async with AsyncClient(address, timeout=30) as c:
        await c.health()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.health()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _measure(daemon: RecordingDaemon, address: str, n: int, max_tokens: int, procs: int) -> dict:
    prompts = [f"stream {i}: the expert cache keeps layer {i % 75} warm" for i in range(n)]
    groups = [prompts[i::procs] for i in range(procs)]
    ctx = mp.get_context("spawn")
    start_at = time.monotonic() + 1.5  # spawned interpreters need a moment to import the client
    pipes, workers = [], []
    for g in groups:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_load_process, args=(address, g, max_tokens, start_at, child), daemon=True)
        p.start()
        pipes.append(parent)
        workers.append(p)
    daemon.reset()
    loop = asyncio.get_running_loop()
    results = []
    for parent, p in zip(pipes, workers):
        results += await loop.run_in_executor(None, parent.recv)
        await loop.run_in_executor(None, p.join, 30)
    t_end = max(stamps[-1][0] for _, stamps in results)
    latencies, mismatched = [], 0
    total = 0
    for rid, stamps in results:
        got = _per_token(stamps)
        sent = _per_token(daemon.arrivals.get(daemon.engine_ids.get(rid, ""), []))
        total += len(got)
        if len(got) != len(sent):
            mismatched += 1
            continue
        latencies += [g - s for g, s in zip(got, sent)]
    steps = daemon.step_times
    wall = t_end - start_at
    in_daemon = [dt for dt, k in daemon.frames for _ in range(k)]  # a token leaves when its frame is done
    return {
        "streams": n,
        "tokens": total,
        "requests_with_unmatched_tokens": mismatched,
        "engine_steps": len(steps),
        "engine_step_median_s": statistics.median(steps),
        "engine_step_mean_s": statistics.fmean(steps),
        "daemon_latency_p50_s": _quantile(in_daemon, 0.5),
        "daemon_latency_p99_s": _quantile(in_daemon, 0.99),
        "added_latency_p50_s": _quantile(latencies, 0.5),
        "added_latency_p99_s": _quantile(latencies, 0.99),
        "added_latency_mean_s": statistics.fmean(latencies),
        "added_latency_p50_over_step": _quantile(latencies, 0.5) / statistics.median(steps),
        "daemon_wall_per_token_s": daemon.dispatch_s / max(1, daemon.dispatch_tokens),
        "daemon_cpu_per_token_s": daemon.dispatch_cpu_s / max(1, daemon.dispatch_tokens),
        "client_tokens_per_s": total / wall,
        "engine_bound_tokens_per_s": total / sum(steps),
        "throughput_over_engine_bound": (total / wall) / (total / sum(steps)),
    }


@contextlib.asynccontextmanager
async def ready_daemon(
    args: argparse.Namespace, model_dir: str, runtime: str, levels: list[int], **settings
) -> AsyncIterator[RecordingDaemon]:
    """The benches' daemon (ZMQ on ipc://{runtime}/bench.sock, the engine's settings from args), once its engine is
    ready; stopped on exit."""
    engine = {k: getattr(args, k) for k in ENGINE_SETTINGS if k not in ("device", "max_running")}
    cfg = ServeConfig(
        model=model_dir,
        listen=(f"ipc://{runtime}/bench.sock",),
        metrics_address="",
        device=args.device,
        max_running=max(levels),
        runtime_dir=runtime,
        client_concurrency=max(levels) + 8,
        stats_interval_s=1.0,
        worker_start_timeout_s=1800,
        **settings,
        **engine,
    )
    daemon = RecordingDaemon(cfg, model_dir)
    await daemon.start()
    try:
        t0 = time.monotonic()
        while not daemon.readiness()[0]:
            if daemon.supervisor.state in ("crash_loop", "failed") or time.monotonic() - t0 > 1800:
                raise RuntimeError(f"engine did not become ready: {daemon.supervisor.reason}")
            await asyncio.sleep(0.1)
        yield daemon
    finally:
        await daemon.stop()


async def _bench(args: argparse.Namespace, model_dir: str, runtime: str) -> dict:
    levels = [int(x) for x in args.concurrency.split(",")]
    address = f"ipc://{runtime}/bench.sock"
    async with ready_daemon(args, model_dir, runtime, levels, http_address="") as daemon:
        rtt = await _round_trip(address)
        log.info("warm-up")
        await _measure(daemon, address, min(8, max(levels)), 8, 1)
        rows = []
        for n in levels:
            procs = 1 if n <= 64 else 2
            row = await _measure(daemon, address, n, args.max_tokens, procs)
            log.info("%d streams: %s", n, row)
            rows.append(row)
        from moed.daemon import server

        return {
            "model": model_dir,
            "device": args.device,
            "max_tokens": args.max_tokens,
            "send_every": server.STEP_SEND_EVERY,
            "health_round_trip_median_s": rtt,
            "cpus": os.cpu_count(),
            "rows": rows,
        }


def run_bench(bench: Callable[..., Awaitable[dict]], args: argparse.Namespace, prefix: str) -> tuple[str, dict]:
    """Run bench(args, model_dir, runtime) on uvloop where installed, in a runtime folder of its own (removed after),
    the worker's torch threads as --worker-threads says; write --out. Returns the model folder and the figures."""
    model_dir = resolve_model(args.model)
    if args.worker_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.worker_threads)  # inherited by the worker process
    runtime = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        try:
            import uvloop

            result = uvloop.run(bench(args, model_dir, runtime))
        except ImportError:
            result = asyncio.run(bench(args, model_dir, runtime))
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return model_dir, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny", help="checkpoint directory or builtin:tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", default="1,8,32,64,128,256")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per stream")
    p.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="CPU threads of the worker's torch (OMP_NUM_THREADS), so that on a small CPU the "
        "daemon and the load generators keep a core; 0 = torch's default",
    )
    p.add_argument(
        "--send-every",
        type=int,
        default=0,
        help="A/B the daemon's replies per message within a step (server.STEP_SEND_EVERY); 0 = as shipped",
    )
    p.add_argument("--out", help="write the figures here as JSON")
    add_engine_arguments(
        p.add_argument_group("engine settings (moed.engine.config)"), exclude=("device", "max_running")
    )
    args = p.parse_args(argv)
    if args.send_every:
        from moed.daemon import server

        server.STEP_SEND_EVERY = args.send_every
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir, result = run_bench(_bench, args, "moedb")
    print(
        f"\nserving benchmark: {Path(model_dir).name} on {args.device}, {args.max_tokens} tokens per stream, "
        f"{result['cpus']} CPUs shared by daemon, worker ({args.worker_threads or 'default'} torch threads) "
        "and load generators"
    )
    print(f"idle Health round trip (transport floor): {result['health_round_trip_median_s'] * 1e3:.3f} ms")
    print(
        "latency per token, ms: 'daemon' = engine frame received -> its replies handed to ZMQ; "
        "'to client' = engine frame received -> the client process has the token"
    )
    head = (
        f"{'streams':>7} {'tokens':>7} {'step ms':>8} {'daemon p50':>10} {'p99':>7} {'to client p50':>13} "
        f"{'p99':>7} {'mean':>7} {'p50/step':>8} {'us/tok wall':>11} {'cpu':>5} {'client tok/s':>12} "
        f"{'engine tok/s':>12} {'ratio':>6}"
    )
    print(head)
    for r in result["rows"]:
        print(
            f"{r['streams']:>7} {r['tokens']:>7} {r['engine_step_median_s'] * 1e3:>8.2f} "
            f"{r['daemon_latency_p50_s'] * 1e3:>10.3f} {r['daemon_latency_p99_s'] * 1e3:>7.3f} "
            f"{r['added_latency_p50_s'] * 1e3:>13.3f} {r['added_latency_p99_s'] * 1e3:>7.3f} "
            f"{r['added_latency_mean_s'] * 1e3:>7.3f} {r['added_latency_p50_over_step']:>8.3f} "
            f"{r['daemon_wall_per_token_s'] * 1e6:>11.1f} {r['daemon_cpu_per_token_s'] * 1e6:>5.1f} "
            f"{r['client_tokens_per_s']:>12.0f} "
            f"{r['engine_bound_tokens_per_s']:>12.0f} {r['throughput_over_engine_bound']:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
