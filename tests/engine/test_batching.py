"""The in-process engine on the tiny checkpoint (fp32, reference attention, torch MoE runner).

Prompt lengths straddle the tiny model's index_topk (16), so dense and sparse attention both run,
and the token budget is small so long prompts are prefilled in chunks next to decoding sequences.
"""

from __future__ import annotations

import pytest
import torch

from moed.engine.llm_engine import EngineConfig, LLMEngine, RequestError
from moed.engine.protocol import SamplingParams
from moed.model.attention_interface import SequenceStep, StepContext

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
LENGTHS = (3, 9, 14, 21, 30, 6)


def _prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]


def _engine(path: str, **kw) -> LLMEngine:
    kw = {"max_running": 4, "max_tokens_per_step": 16, "page_size": 4, **kw}
    return LLMEngine(EngineConfig(model=path, **kw))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return _engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    """Each prompt's greedy tokens when it runs by itself."""
    return [engine.generate([p], GREEDY)[0] for p in _prompts()]


def _drain(engine: LLMEngine) -> dict[str, list]:
    out: dict[str, list] = {}
    while engine.has_unfinished:
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o)
    return out


def test_engine_concurrent_requests_get_their_tokens_alone(engine, alone):
    # Six requests, four running at most, 16 tokens per step: queueing, chunked prefill and decode mix.
    together = engine.generate(_prompts(), GREEDY)
    assert together == alone
    assert all(len(t) == GREEDY.max_tokens for t in together)
    assert engine.kv.num_free == engine.kv.num_pages


def test_engine_requests_arriving_mid_flight(engine, alone):
    prompts = _prompts()
    engine.add_request("late-0", prompts[0], GREEDY)
    got: dict[str, list[int]] = {}
    added = 1
    while engine.has_unfinished:
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        if added < len(prompts):  # one new request after every step
            engine.add_request(f"late-{added}", prompts[added], GREEDY)
            added += 1
    assert [got[f"late-{i}"] for i in range(len(prompts))] == alone


def test_engine_preemption_recomputes_the_same_tokens(tiny_checkpoint, alone):
    # 14 pages of 4 positions cannot hold four running sequences: later arrivals get preempted.
    small = _engine(tiny_checkpoint, kv_pages=14)
    together = small.generate(_prompts(), GREEDY)
    assert small.scheduler.num_preemptions > 0
    assert together == alone
    assert small.kv.num_free == small.kv.num_pages
    stats = small.stats()
    assert stats.preemptions == small.scheduler.num_preemptions and stats.running == stats.waiting == 0


def test_engine_abort_mid_prefill_and_mid_decode_frees_kv(engine):
    p = _prompts()
    engine.add_request("long", p[4], GREEDY)  # 30 tokens: two 16-token chunks
    engine.add_request("short", p[0], GREEDY)
    engine.step()
    long_seq = engine.scheduler.by_id["long"]
    assert 0 < long_seq.num_computed < long_seq.num_tokens and long_seq.pages
    [out] = engine.abort(["long"])
    assert out.finish_reason == "abort" and out.new_token_ids == []
    assert long_seq.pages == [] and long_seq.kv is None
    while not engine.scheduler.by_id["short"].in_decode or engine.scheduler.by_id["short"].num_output_tokens < 3:
        engine.step()
    short = engine.scheduler.by_id["short"]
    [out] = engine.abort(["short", "unknown-id"], reason="stop")
    assert out.finish_reason == "stop" and out.num_output_tokens == short.num_output_tokens
    assert short.pages == [] and short.kv is None
    assert not engine.has_unfinished and engine.kv.num_free == engine.kv.num_pages
    engine.add_request("queued", p[1], GREEDY)
    [out] = engine.abort(["queued"])
    assert out.finish_reason == "abort" and not engine.has_unfinished


def test_engine_seeds_reproduce_across_batches_and_preemption(tiny_checkpoint, engine):
    prompts = _prompts(seed=3)
    params = [
        SamplingParams(
            temperature=0.8,
            top_p=0.9,
            top_k=50,
            seed=100 + i,
            max_tokens=8,
            ignore_eos=True,
            repetition_penalty=1.1,
            presence_penalty=0.2,
        )
        for i in range(len(prompts))
    ]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert engine.generate(prompts, params) == alone
    small = _engine(tiny_checkpoint, kv_pages=14)
    assert small.generate(prompts, params) == alone and small.scheduler.num_preemptions > 0
    reseeded = [
        SamplingParams(**{**{f: getattr(sp, f) for f in sp.__struct_fields__}, "seed": sp.seed + 1}) for sp in params
    ]
    assert engine.generate(prompts, reseeded) != alone


def test_engine_stops_and_lengths(engine, alone):
    prompt = _prompts()[2]
    ref = alone[2]
    stop_at = ref[4]
    first = ref.index(stop_at)
    engine.add_request("stop", prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True))
    engine.add_request("len", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    out = _drain(engine)
    assert [t for o in out["stop"] for t in o.new_token_ids] == ref[: first + 1]
    assert out["stop"][-1].finish_reason == "stop"
    assert [t for o in out["len"] for t in o.new_token_ids] == ref[:3] and out["len"][-1].finish_reason == "length"
    # EOS stops unless ignore_eos: pretend the model's first token is an end-of-sequence id.
    engine.eos_token_ids = frozenset({ref[0]})
    try:
        assert engine.generate([prompt], SamplingParams(max_tokens=10)) == [ref[:1]]
    finally:
        engine.eos_token_ids = frozenset(engine.cfg.eos_token_ids)


def test_engine_logprobs_are_the_models(engine):
    prompt = _prompts()[1]
    engine.add_request("lp", prompt, SamplingParams(max_tokens=2, ignore_eos=True, logprobs=3))
    outs = _drain(engine)["lp"]
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == 2
    runner = engine.runner
    be = runner.backend
    with torch.inference_mode():
        ctx = StepContext(positions=torch.arange(len(prompt)), seqs=[SequenceStep(0, len(prompt), be.new_sequence())])
        logits = runner.logits(engine.model(torch.tensor(prompt), ctx, be, runner.moe)[-1:])[0]
    ref = torch.log_softmax(logits, dim=-1)
    first = lps[0]
    assert first.token_id == int(ref.argmax())
    assert abs(first.logprob - ref.max().item()) < 1e-4
    assert [t for t, _ in first.top] == ref.topk(3).indices.tolist()
    assert all(abs(lp - ref[t].item()) < 1e-4 for t, lp in first.top)


def test_engine_refuses_bad_requests_by_name(engine):
    V = engine.cfg.vocab_size
    cases = [
        ("", [1], SamplingParams(), "request id"),
        ("a", [], SamplingParams(), "prompt_token_ids"),
        ("a", [V], SamplingParams(), rf"\[0, {V}\)"),
        ("a", [1], SamplingParams(temperature=-1.0), "sampling.temperature"),
        ("a", [1], SamplingParams(top_p=0.0), "sampling.top_p"),
        ("a", [1], SamplingParams(top_k=-1), "sampling.top_k"),
        ("a", [1], SamplingParams(min_p=2.0), "sampling.min_p"),
        ("a", [1], SamplingParams(repetition_penalty=0.0), "sampling.repetition_penalty"),
        ("a", [1], SamplingParams(frequency_penalty=3.0), "sampling.frequency_penalty"),
        ("a", [1], SamplingParams(max_tokens=0), "sampling.max_tokens"),
        ("a", [1], SamplingParams(stop_token_ids=[-1]), "sampling.stop_token_ids"),
        ("a", [1], SamplingParams(logprobs=99), "sampling.logprobs"),
        ("a", [1] * 5000, SamplingParams(), "shorter than"),
    ]
    for rid, prompt, sp, match in cases:
        with pytest.raises(RequestError, match=match):
            engine.add_request(rid, prompt, sp)
    engine.add_request("dup", [1, 2], GREEDY)
    with pytest.raises(RequestError, match="already in flight"):
        engine.add_request("dup", [1, 2], GREEDY)
    engine.abort(["dup"])


def test_engine_failed_step_errors_its_requests_and_keeps_serving(engine, alone, monkeypatch):
    prompts = _prompts()
    engine.add_request("doomed", prompts[0], GREEDY)
    calls = {"n": 0}
    real = engine.runner.run

    def fail_once(input_ids, ctx):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real(input_ids, ctx)

    monkeypatch.setattr(engine.runner, "run", fail_once)
    [out] = engine.step()
    assert out.finish_reason == "error" and "simulated kernel failure" in out.error
    assert engine.kv.num_free == engine.kv.num_pages and not engine.has_unfinished
    assert engine.generate([prompts[0]], GREEDY) == [alone[0]]


def test_engine_stats_count_tokens_and_times(tiny_checkpoint):
    e = _engine(tiny_checkpoint)
    e.warmup()
    assert e.stats().num_steps == 0
    prompts = _prompts()[:3]
    e.generate(prompts, GREEDY)
    s = e.stats()
    assert s.prompt_tokens == sum(len(p) for p in prompts)
    assert s.generation_tokens == 3 * GREEDY.max_tokens
    assert s.num_steps > 0 and s.kv_usage == 0.0 and s.running == 0
    assert set(s.step_time_s) == {"schedule", "prepare", "launch", "wait", "commit", "total"}
    assert s.step_time_s["total"] > 0
    assert e.stats().step_time_s == {}  # the window was taken
