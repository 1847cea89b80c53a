"""Hostile-client benchmark: fuzzed messages, maximum-size prompts and oversized prompts against a
daemon that serves 32 live streams (issue 15's three targets).

    python -m moed.ops.bench.hostile [--model builtin:tiny] [--messages 100000] [--streams 32]
        [--max-message-bytes 0] [--out hostile.json]

The real daemon runs in this process, with the real engine worker on the CPU, and a sampler of its event loop's
lag; the clients run in other processes (hostile_load.py). The phases are `_bench`'s. Prints a table last; --out
writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from moed.ops.bench.hostile_fuzz import FuzzTally
from moed.ops.bench.hostile_load import filler_text, role_main, role_result, run_async, start_role

log = logging.getLogger("bench.hostile")


class LagSampler:
    """How late a 5 ms sleep wakes up in the daemon's loop, stamped; and the process's RSS, peak kept."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.rss_peak = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.005)
            self.samples.append((time.monotonic(), loop.time() - t0 - 0.005))
            if len(self.samples) % 4 == 0:
                self.rss_peak = max(self.rss_peak, rss_bytes())

    def window(self, start: float, end: float) -> dict:
        lags = sorted(lag for t, lag in self.samples if start <= t <= end)
        if not lags:
            return {"n": 0}
        return {
            "n": len(lags),
            "p50_ms": 1e3 * lags[len(lags) // 2],
            "p99_ms": 1e3 * _quantile(lags, 0.99),
            "max_ms": 1e3 * lags[-1],
        }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _gaps(stamps: list[float], start: float, end: float) -> dict:
    """Gaps between consecutive chunk arrivals (any stream) inside a window: the streams' stalls."""
    ts = sorted(t for t in stamps if start <= t <= end)
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    return {"chunks": len(ts), "max_gap_ms": 1e3 * max(gaps, default=0.0), "p99_gap_ms": 1e3 * _quantile(gaps, 0.99)}


async def _bench(args: argparse.Namespace) -> dict:
    """The three phases against one daemon, in turn:
    lag      the streams run alone, then alongside maximum-size prompts sent back to back (the largest
             message the daemon reads, text that must be counted and refused; and the largest prompt
             the model admits); event-loop lag p50/p99/max in each window, and the streams' longest
             gap between chunks;
    fuzz     --messages fuzzed messages (hostile_messages.py) from 32 connections, each followed by a Health
             fence; every reply is checked against what the protocol says the message must get
             (hostile_fuzz.py); a fence unanswered for 10 s is a deaf daemon. The streams keep running and
             are checked;
    memory   the daemon's RSS, idle after the phases above, then 10 oversized prompts at once (8 MiB, the
             largest text max_message_bytes lets in, the largest the character bound lets in), then RSS
             1 s and 5 s after the last refusal."""
    from moed.daemon.admission import message_bytes_for
    from moed.daemon.config import ServeConfig
    from moed.daemon.server import Daemon
    from moed.daemon.service import resolve_model

    model_dir = resolve_model(args.model)
    run_dir = tempfile.mkdtemp(prefix="moedh", dir="/tmp")
    address = f"ipc://{run_dir}/c.sock"
    cfg = ServeConfig(
        model=model_dir,
        listen=(address,),
        metrics_address="",
        http_address="",
        runtime_dir=run_dir,
        device="cpu",
        max_message_bytes=args.max_message_bytes,
        client_concurrency=1024,
        max_running=args.streams + 16,
    )
    steps: list[tuple[float, float]] = []  # (arrival, the worker's step time): the streams' pace is the engine's

    class StepRecordingDaemon(Daemon):
        def _on_step(self, msg, generation):
            steps.append((time.monotonic(), msg.step_time_s))
            super()._on_step(msg, generation)

    def step_ms(start: float, end: float) -> dict:
        xs = sorted(s for t, s in steps if start <= t <= end)
        return {
            "steps": len(xs),
            "median_ms": 1e3 * xs[len(xs) // 2] if xs else 0.0,
            "max_ms": 1e3 * xs[-1] if xs else 0.0,
        }

    daemon = StepRecordingDaemon(cfg, model_dir)
    sampler = LagSampler()
    out: dict = {"model": args.model, "streams": args.streams, "messages": args.messages}
    await daemon.start()
    sampling = asyncio.ensure_future(sampler.run())
    children: list[asyncio.subprocess.Process] = []
    try:
        while not daemon.readiness()[0]:
            await asyncio.sleep(0.1)
        info = daemon.supervisor.info
        limit = daemon.admission.max_message_bytes
        max_chars = info.max_model_len * daemon.tokenizer.max_token_chars
        envelope = 256  # the message's fields around the prompt
        biggest = min(limit - envelope, max_chars)  # the largest prompt read: counted in windows and refused
        admitted = 3 * info.max_model_len // 2  # the largest prompt admitted, in characters of filler text
        while len(daemon.tokenizer.encode(filler_text(admitted))) > info.max_model_len - 8:
            admitted = int(admitted * 0.95)
        out.update(
            max_model_len=info.max_model_len,
            max_message_bytes=limit,
            auto_limit=message_bytes_for(info.max_model_len),
            max_prompt_chars=max_chars,
        )
        log.info("ready: max_model_len %d, max_message_bytes %d", info.max_model_len, limit)

        log.info("lag phase: %d streams, then %d maximum-size prompts of each kind", args.streams, args.big_prompts)
        streams = await start_role("streams", address, str(args.streams), str(args.stream_tokens))
        children.append(streams)
        line = await asyncio.wait_for(streams.stdout.readline(), 600)
        if line.strip() != b"ready":
            raise RuntimeError(f"the streams process said {line!r}")
        t0 = time.monotonic()
        await asyncio.sleep(args.window_s)
        t1 = time.monotonic()
        sizes = sorted({limit - envelope, biggest})  # the largest message; the largest text that gets counted
        specs = [*((n, 4) for n in sizes), (admitted, 4)] * args.big_prompts
        sent = await role_result(await start_role("prompts", address, json.dumps(specs)), 3600)
        t2 = time.monotonic()
        out["lag"] = {
            "streams_alone": sampler.window(t0, t1),
            "with_max_prompts": sampler.window(t1, t2),
            "refused_prompt_bytes": sizes,
            "admitted_prompt_bytes": admitted,
            "engine_alone": step_ms(t0, t1),
            "engine_with_max_prompts": step_ms(t1, t2),
            "rounds": args.big_prompts,
            "outcomes": sorted({what.split(" (")[0].split(":")[0] for *_, what in sent["results"]}),
        }

        log.info("fuzz phase: %d messages", args.messages)
        t3 = time.monotonic()
        fuzzer = await start_role("fuzz", address, str(args.messages), str(args.seed), str(limit))
        tally = msgspec.convert(await role_result(fuzzer, 7200), FuzzTally)
        t4 = time.monotonic()
        streams.stdin.close()
        streamed = await role_result(streams, 600)
        stamps = streamed["stamps"]
        out["lag"]["gaps_alone"] = _gaps(stamps, t0, t1)
        out["lag"]["gaps_with_max_prompts"] = _gaps(stamps, t1, t2)
        problems = daemon.liveness.problems()
        out["fuzz"] = {
            "sent": tally.sent,
            "answered": tally.answered,
            "wrong": tally.wrong_count,
            "deaf": int(tally.deaf or bool(problems)),
            "first_wrong": tally.wrong,
            "outcomes": tally.by_outcome,
            "seconds": t4 - t3,
            "lag": sampler.window(t3, t4),
            "gaps": _gaps(stamps, t3, t4),
            "engine": step_ms(t3, t4),
            "liveness_problems": problems,
            "task_failures": sum(daemon.liveness.failures.values()),
            "streams_completed": streamed["done"],
            "stream_failures": streamed["failures"][:10],
        }

        log.info("memory phase: 10 oversized prompts at once")
        await asyncio.sleep(2.0)
        baseline = rss_bytes()
        sampler.rss_peak = baseline
        # The issue's 8 MiB prompt, the largest the message limit lets in, the largest the character bound lets in.
        kinds = sorted({8 << 20, limit - envelope, min(max_chars - 1, limit - envelope)})
        sizes = [kinds[i % len(kinds)] for i in range(10)]
        refused = await role_result(await start_role("together", address, json.dumps([(n, 4) for n in sizes])), 3600)
        await asyncio.sleep(1.0)
        after = rss_bytes()
        await asyncio.sleep(4.0)
        settled = rss_bytes()
        out["memory"] = {
            "baseline_mb": baseline / 2**20,
            "peak_mb": sampler.rss_peak / 2**20,
            "after_mb": after / 2**20,
            "after_vs_baseline": after / baseline - 1,
            "after_5s_mb": settled / 2**20,
            "after_5s_vs_baseline": settled / baseline - 1,
            "prompt_bytes": sorted(set(sizes)),
            "refusals": sorted({what.split(":")[0] for *_, what in refused["results"]}),
        }
    finally:
        for proc in children:
            if proc.returncode is None:
                proc.kill()
        sampling.cancel()
        await daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _table(r: dict) -> str:
    lag, fz, mem = r["lag"], r["fuzz"], r["memory"]

    def w(x: dict) -> str:
        return f"p50 {x['p50_ms']:.1f} / p99 {x['p99_ms']:.1f} / max {x['max_ms']:.1f} ms ({x['n']} samples)"

    lines = [
        f"hostile-client bench: {r['model']}, max_model_len {r['max_model_len']}, max_message_bytes "
        f"{r['max_message_bytes']} (auto would be {r['auto_limit']}), {r['streams']} live streams",
        f"fuzz      {fz['sent']} messages in {fz['seconds']:.0f} s: {fz['answered']} answered as the protocol says, "
        f"{fz['wrong']} wrong, deaf daemons {fz['deaf']}, serving-task failures {fz['task_failures']}  "
        "[target: all answered, 0 deaf]",
        f"          streams meanwhile: {fz['streams_completed']} completed, {len(fz['stream_failures'])} failed, "
        f"longest chunk gap {fz['gaps']['max_gap_ms']:.0f} ms (engine step median {fz['engine']['median_ms']:.0f} / "
        f"max {fz['engine']['max_ms']:.0f} ms); loop lag {w(fz['lag'])}",
        f"lag       {r['streams']} streams alone:         {w(lag['streams_alone'])}",
        f"          + max-size prompts:       {w(lag['with_max_prompts'])}  [target: p99 < 50 ms]",
        f"            ({' and '.join(map(str, lag['refused_prompt_bytes']))} B refused, "
        f"{lag['admitted_prompt_bytes']} B admitted, {lag['rounds']} of each: {', '.join(lag['outcomes'])})",
        f"          streams' longest chunk gap {lag['gaps_alone']['max_gap_ms']:.0f} ms alone, "
        f"{lag['gaps_with_max_prompts']['max_gap_ms']:.0f} ms with the prompts (engine step median "
        f"{lag['engine_alone']['median_ms']:.0f} / {lag['engine_with_max_prompts']['median_ms']:.0f} ms, max "
        f"{lag['engine_alone']['max_ms']:.0f} / {lag['engine_with_max_prompts']['max_ms']:.0f} ms)",
        f"memory    RSS baseline {mem['baseline_mb']:.1f} MB, peak {mem['peak_mb']:.1f} MB; after 10 oversized "
        f"prompts at once {mem['after_mb']:.1f} MB at 1 s ({100 * mem['after_vs_baseline']:+.1f}%), "
        f"{mem['after_5s_mb']:.1f} MB at 5 s ({100 * mem['after_5s_vs_baseline']:+.1f}%)  [target: within 10%]",
        f"            ({', '.join(map(str, mem['prompt_bytes']))} B; {', '.join(mem['refusals'])})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--messages", type=int, default=100_000, help="fuzzed messages")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream before it is restarted")
    p.add_argument("--max-message-bytes", type=int, default=0, help="the daemon's setting (0: auto)")
    p.add_argument("--big-prompts", type=int, default=3, help="maximum-size prompts of each kind in the lag phase")
    p.add_argument("--window-s", type=float, default=5.0, help="the streams-alone window of the lag phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--role", nargs="+", help=argparse.SUPPRESS)  # a load process of this benchmark
    args = p.parse_args(argv)
    if args.role:
        return role_main(args.role)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `moed serve` sets it
    result = run_async(_bench(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(_table(result))
    return 0 if result["fuzz"]["deaf"] == 0 and result["fuzz"]["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
