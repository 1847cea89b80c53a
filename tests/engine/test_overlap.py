"""The overlapped engine (step n + 1 launched before step n's tokens are read back) against the plain one.

Tiny checkpoint, CPU reference backend (the GPU tests at the end use graphs and the offload runner).
Every test serves the same requests through an engine with overlap and one without, the way the
worker does (outputs as they come, aborts between steps), and compares what a caller sees token for
token. The lag paths are checked to have run: inputs taken from the step in flight, tokens of
sequences that finished first discarded, preemption of a sequence with a token in flight.
"""

from __future__ import annotations

import pytest
import torch

from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams

BASE = {"max_running": 4, "max_tokens_per_step": 16, "page_size": 4}
LENGTHS = (3, 9, 14, 21, 30, 6, 2, 17, 11, 25)
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def _prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]


def _engine(path: str, overlap: bool, **kw) -> LLMEngine:
    e = LLMEngine(EngineConfig(model=path, overlap=overlap, **{**BASE, **kw}))
    assert e.overlap is overlap
    e.fed_from_device = 0  # input tokens taken from the step in flight
    real = e.runner.upload

    def upload(host, pending=None):
        e.fed_from_device += host.num_pending
        return real(host, pending)

    e.runner.upload = upload
    return e


@pytest.fixture(scope="module")
def engines(tiny_checkpoint) -> dict[bool, LLMEngine]:
    return {on: _engine(tiny_checkpoint, on) for on in (True, False)}


def _serve(engine: LLMEngine, requests, per_step: int | None = None, react=None) -> dict[str, dict]:
    """Serve (request id, prompt, params) like the worker: `per_step` arrivals before each step (None: all at
    once); after each step `react(seen)` returns (request id, reason) pairs to abort (the daemon's stop strings
    and cancels). Returns per request what a caller saw."""
    seen = {rid: {"tokens": [], "finish": None, "logprobs": [], "late": 0} for rid, _, _ in requests}

    def take(outputs) -> None:
        for o in outputs:
            s = seen[o.request_id]
            s["late"] += s["finish"] is not None  # anything after a finish is a bug
            s["tokens"] += o.new_token_ids
            s["logprobs"] += [(lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in o.logprobs or []]
            s["finish"] = o.finish_reason or s["finish"]

    queue = list(requests)
    n = per_step or len(queue)
    while queue or engine.has_unfinished:
        for rid, prompt, sp in queue[:n]:
            engine.add_request(rid, prompt, sp)
        queue = queue[n:]
        take(engine.step())
        for rid, reason in react(seen) if react else []:
            take(engine.abort([rid], reason))
            assert rid not in engine.scheduler.by_id
    assert engine.kv.num_free == engine.kv.num_pages and not engine.scheduler.running
    assert all(s["late"] == 0 and s["finish"] is not None for s in seen.values())
    return seen


def _same(on: dict[str, dict], off: dict[str, dict]) -> None:
    """Tokens, finish reasons and logprob ids exactly; logprob values up to float noise (batches differ)."""

    def values(seen):
        return {rid: [lp[1] for lp in s["logprobs"]] for rid, s in seen.items()}

    def exact(seen):
        return {rid: {**s, "logprobs": [(lp[0], lp[2]) for lp in s["logprobs"]]} for rid, s in seen.items()}

    assert exact(on) == exact(off)
    for a, b in zip(values(on).values(), values(off).values()):
        assert a == pytest.approx(b, abs=1e-4)


def _both(engines, requests, **kw) -> dict[str, dict]:
    fed, discarded = engines[True].fed_from_device, engines[True].discarded_tokens
    on, off = _serve(engines[True], requests, **kw), _serve(engines[False], requests, **kw)
    _same(on, off)
    assert engines[True].fed_from_device > fed and engines[False].fed_from_device == 0
    engines[True].new_discards = engines[True].discarded_tokens - discarded
    return on


@pytest.fixture(scope="module")
def free(engines) -> list[list[int]]:
    """Each prompt's first 12 greedy tokens, served alone by the plain engine."""
    return [engines[False].generate([p], GREEDY)[0] for p in _prompts()]


def test_engine_overlap_many_requests_with_stop_ids_eos_and_lengths(engines, free):
    eos = free[2][6]
    requests = []
    for i, p in enumerate(_prompts()):
        kind = i % 4
        if kind == 0:  # a stop id that occurs mid-output
            sp = SamplingParams(max_tokens=12, stop_token_ids=[free[i][4]], ignore_eos=True)
        elif kind == 1:  # lengths, including a single token (finished by the prefill's own token)
            sp = SamplingParams(max_tokens=1 + i % 7, ignore_eos=True)
        elif kind == 2:  # EOS honoured
            sp = SamplingParams(max_tokens=12)
        else:  # a stop id that never occurs
            sp = SamplingParams(max_tokens=12, stop_token_ids=[1], ignore_eos=True)
        requests.append((f"r{i}", p, sp))
    for e in engines.values():
        e.eos_token_ids = frozenset({eos})
    try:
        seen = _both(engines, requests, per_step=2)
    finally:
        for e in engines.values():
            e.eos_token_ids = frozenset(e.cfg.eos_token_ids)
    for i, ref in enumerate(free):
        s = seen[f"r{i}"]
        assert s["tokens"] == ref[: len(s["tokens"])]
    assert seen["r0"]["finish"] == "stop" and seen["r0"]["tokens"][-1] == free[0][4]
    assert seen["r2"]["finish"] == "stop" and seen["r2"]["tokens"][-1] == eos
    assert seen["r1"]["tokens"] == free[1][:2] and seen["r1"]["finish"] == "length"
    assert engines[True].new_discards > 0  # stopped sequences were already in the step in flight


def _piece(token: int) -> str:
    """A toy detokeniser: one or two letters per token, so stop strings span token boundaries."""
    return "abcdefg"[token % 7] * (1 + token % 2)


def test_engine_overlap_stop_strings_found_by_the_daemon(engines, free):
    prompts = _prompts()[:6]
    stops = {}
    for i, ref in enumerate(free[:6]):
        text = "".join(_piece(t) for t in ref)
        start = len(_piece(ref[0])) + len(_piece(ref[1])) + len(_piece(ref[2])) - 1  # ends token 3, spans 4 and 5
        stops[f"s{i}"] = text[start : start + 4]

    def daemon(seen):  # finds each stop string in the text so far, as the daemon does, and aborts with "stop"
        return [
            (rid, "stop")
            for rid, s in seen.items()
            if s["finish"] is None and stops[rid] in "".join(_piece(t) for t in s["tokens"])
        ]

    requests = [(f"s{i}", p, GREEDY) for i, p in enumerate(prompts)]
    discarded = engines[True].discarded_tokens
    seen = _both(engines, requests, react=daemon)
    for i, ref in enumerate(free[:6]):
        s = seen[f"s{i}"]
        text = "".join(_piece(t) for t in s["tokens"])
        assert s["finish"] == "stop" and s["tokens"] == ref[: len(s["tokens"])] and stops[f"s{i}"] in text
        assert stops[f"s{i}"] not in "".join(_piece(t) for t in s["tokens"][:-1])  # stopped at the first match
    assert engines[True].discarded_tokens > discarded  # each abort dropped the token in flight


def test_engine_overlap_aborts_mid_prefill_mid_decode_and_queued(engines, free):
    prompts = _prompts()
    requests = [(f"a{i}", p, GREEDY) for i, p in enumerate(prompts)]
    steps = {True: 0, False: 0}

    def cancel(seen):
        out = []
        if not seen["a4"]["tokens"] and seen["a4"]["finish"] is None:
            out.append(("a4", "abort"))  # 30-token prompt: still in its first chunk
        if len(seen["a1"]["tokens"]) >= 3 and seen["a1"]["finish"] is None:
            out.append(("a1", "abort"))  # decoding, with its next token in flight under overlap
        if seen["a9"]["finish"] is None and not seen["a9"]["tokens"]:
            out.append(("a9", "abort"))  # still queued behind max_running
        return out

    for on in (True, False):
        real = cancel

        def counted(seen, on=on, real=real):
            steps[on] += 1
            return real(seen)

        engines[on].react = counted
    on = _serve(engines[True], requests, react=engines[True].react)
    off = _serve(engines[False], requests, react=engines[False].react)
    _same(on, off)
    assert on["a4"]["tokens"] == [] and on["a9"]["tokens"] == [] and on["a4"]["finish"] == "abort"
    assert on["a1"]["tokens"] == free[1][:3] and on["a1"]["finish"] == "abort"
    for i in (0, 2, 3, 5, 6, 7, 8):
        assert on[f"a{i}"]["tokens"] == free[i] and on[f"a{i}"]["finish"] == "length"


def test_engine_overlap_preemption_with_tokens_in_flight(tiny_checkpoint, free):
    # 14 pages of 4 positions cannot hold four running sequences: later arrivals get preempted, some while their
    # next token is still being sampled. Greedy and seeded sampling with penalties and logprobs.
    small = {on: _engine(tiny_checkpoint, on, kv_pages=14) for on in (True, False)}
    in_flight = []
    real = small[True].scheduler._preempt

    def preempt(seq):
        in_flight.append(seq.num_pending)
        real(seq)

    small[True].scheduler._preempt = preempt
    prompts = _prompts()[:6]
    seen = _both(small, [(f"g{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert [seen[f"g{i}"]["tokens"] for i in range(6)] == free[:6]
    params = [
        SamplingParams(
            temperature=0.8,
            top_p=0.9,
            top_k=50,
            seed=100 + i,
            max_tokens=8,
            ignore_eos=True,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.4,
            logprobs=2,
        )
        for i in range(6)
    ]
    seen = _both(small, [(f"t{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    assert all(len(seen[f"t{i}"]["logprobs"]) == 8 for i in range(6))
    assert small[True].scheduler.num_preemptions > 0 and small[False].scheduler.num_preemptions > 0
    assert any(n > 0 for n in in_flight)


def test_engine_overlap_seeds_reproduce_alone_and_in_a_batch(engines):
    # The penalties count the previous token while it is still on the device (gathered there, not read back).
    prompts = _prompts(seed=3)[:5]
    params = [
        SamplingParams(
            temperature=1.0,
            seed=7 + i,
            max_tokens=8,
            ignore_eos=True,
            repetition_penalty=1.5,
            presence_penalty=1.0,
            min_p=0.02,
        )
        for i in range(len(prompts) - 2)
    ]
    # Greedy rows with negative penalties mostly repeat their last token: only right if it is counted in flight.
    params += [
        SamplingParams(max_tokens=8, ignore_eos=True, presence_penalty=-2.0, frequency_penalty=-1.0),
        SamplingParams(max_tokens=8, ignore_eos=True, repetition_penalty=0.3),
    ]
    alone = [engines[True].generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [engines[False].generate([p], sp)[0] for p, sp in zip(prompts, params)] == alone
    seen = _both(engines, [(f"x{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))], per_step=1)
    assert [seen[f"x{i}"]["tokens"] for i in range(len(prompts))] == alone


def test_engine_overlap_length_limits_launch_no_extra_step(tiny_checkpoint, engines, free):
    e = engines[True]
    steps, discarded = e.num_steps, e.discarded_tokens
    assert e.generate([_prompts()[0]], SamplingParams(max_tokens=5, ignore_eos=True)) == [free[0][:5]]
    assert e.num_steps - steps == 5 and e.discarded_tokens == discarded  # prefill + 4 decodes, nothing wasted
    # max_model_len: the sequence stops at 24 tokens, prompt included, whatever its max_tokens.
    short = {on: _engine(tiny_checkpoint, on, max_model_len=24) for on in (True, False)}
    seen = _both(short, [("m", _prompts()[3], SamplingParams(max_tokens=50, ignore_eos=True))])
    assert seen["m"]["tokens"] == free[3][:3] and seen["m"]["finish"] == "length"
    assert short[True].discarded_tokens == 0
    # Speculative decoding verifies drafts before the next step can be shaped: it never overlaps.
    spec = LLMEngine(EngineConfig(model=tiny_checkpoint, overlap=True, spec_steps=1, **BASE))
    assert spec.overlap is False
    assert spec.generate([_prompts()[0]], GREEDY) == [free[0]] and spec.flush() == []


def test_engine_overlap_failed_launch_errors_its_requests_and_keeps_serving(engines, free, monkeypatch):
    e = engines[True]
    prompts = _prompts()
    e.add_request("f0", prompts[0], GREEDY)
    e.add_request("f1", prompts[1], GREEDY)
    calls = {"n": 0}
    real = e.runner.run

    def fail_third(input_ids, ctx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real(input_ids, ctx)

    monkeypatch.setattr(e.runner, "run", fail_third)
    outs: dict[str, list] = {"f0": [], "f1": []}
    while e.has_unfinished:
        for o in e.step():
            outs[o.request_id].append(o)
    for rid, ref in (("f0", free[0]), ("f1", free[1])):
        last = outs[rid][-1]
        assert last.finish_reason == "error" and "simulated kernel failure" in last.error
        got = [t for o in outs[rid] for t in o.new_token_ids]
        assert got == ref[: len(got)] and last.num_output_tokens == len(got)
    assert e.kv.num_free == e.kv.num_pages and e._inflight is None
    assert e.generate([prompts[2]], GREEDY) == [free[2]]


# GPU: CUDA graphs and the offload runner, where the lag actually hides host work.

EXPERT_BYTES = 49152  # the tiny model's bf16 expert


def _gpu_engine(path: str, overlap: bool) -> LLMEngine:
    e = LLMEngine(
        EngineConfig(
            model=path,
            device="cuda",
            dtype="bf16",
            max_running=4,
            max_tokens_per_step=64,
            page_size=4,
            moe="offload",
            expert_cache_gb=3 * 8 * EXPERT_BYTES / 2**30,
            graph_max_batch=4,
            graph_max_context=16,
            overlap=overlap,
            miss_service="copy",
        )
    )
    e.warmup()
    assert e.runner.graphs is not None
    return e


@pytest.mark.gpu
def test_engine_overlap_gpu_graphs_keep_greedy_and_seeded_tokens(tiny_checkpoint):
    prompts = _prompts((3, 5, 9))
    on, off = _gpu_engine(tiny_checkpoint, True), _gpu_engine(tiny_checkpoint, False)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    seeded = [
        SamplingParams(
            temperature=0.9, top_k=20, seed=i, max_tokens=6, ignore_eos=True, repetition_penalty=1.2, logprobs=1
        )
        for i in range(3)
    ]
    for params in (sp, seeded):
        assert on.generate(prompts, params) == off.generate(prompts, params)
    assert on.runner.graph_steps > 0 and on.kv.num_free == on.kv.num_pages


@pytest.mark.gpu
def test_engine_overlap_gpu_launch_never_waits_for_the_device(tiny_checkpoint):
    e = _gpu_engine(tiny_checkpoint, True)
    e.add_request("a", _prompts((3,))[0], SamplingParams(max_tokens=6, ignore_eos=True))
    e.step()  # the prefill is in flight; its token is pending
    prev, e._inflight = e._inflight, None
    assert prev is not None
    batch = e.scheduler.schedule()
    graph_steps = e.runner.graph_steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the launch raises
    try:
        launched = e._launch(batch, prev.pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert e.runner.graph_steps == graph_steps + 1 and launched is not None
    first = e._read_back(prev)[0].new_token_ids
    second = e._read_back(launched)[0].new_token_ids
    e.abort(["a"])
    ref = _gpu_engine(tiny_checkpoint, False).generate(
        [_prompts((3,))[0]], SamplingParams(max_tokens=2, ignore_eos=True)
    )
    assert first + second == ref[0]
