"""Speculative decoding with the MTP layer: greedy equivalence, the accept path, rejection sampling."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams
from moed.engine.sampler import STREAM_DRAFT, Sampler, SamplingRow, SamplingTensors, row_keys, sampling_probs
from moed.engine.spec_decode import MTPDrafter, verify_drafts

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
LENGTHS = (4, 13, 22, 7)


def _prompts(seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in LENGTHS]


def _engine(path: str, **kw) -> LLMEngine:
    kw = {"max_running": 4, "max_tokens_per_step": 16, "page_size": 4, **kw}
    return LLMEngine(EngineConfig(model=path, **kw))


@pytest.fixture(scope="module")
def plain(tiny_checkpoint) -> list[list[int]]:
    e = _engine(tiny_checkpoint)
    return [e.generate([p], GREEDY)[0] for p in _prompts()]


@pytest.mark.parametrize("k", [1, 3])
def test_spec_greedy_equals_plain_greedy(tiny_checkpoint, plain, k):
    e = _engine(tiny_checkpoint, spec_steps=k)
    assert e.generate(_prompts(), GREEDY) == plain
    s = e.stats()
    assert s.spec_draft_tokens > 0 and 0 <= s.spec_accepted_tokens <= s.spec_draft_tokens
    assert e.kv.num_free == e.kv.num_pages


class OracleDrafter(MTPDrafter):
    """Runs the real MTP draft step (its caches and bookkeeping), then replaces the drafts with the
    known greedy continuation, wrong at chosen places: the verifier must accept exactly the right prefix."""

    truth: ClassVar[dict[tuple[int, ...], list[int]]] = {}

    def run(self, inputs):
        super().run(inputs)
        for inp in inputs:
            seq = inp.seq
            if not inp.propose:
                continue
            ref = self.truth[tuple(seq.prompt_token_ids)]
            o = seq.num_output_tokens
            drafts = list(ref[o : o + self.num_steps])
            drafts += [1] * (self.num_steps - len(drafts))
            wrong_at = (o + len(seq.prompt_token_ids)) % (self.num_steps + 2)  # past the end: all right
            if wrong_at < len(drafts):
                drafts[wrong_at] = (drafts[wrong_at] + 1) % 1000
            seq.draft_token_ids = drafts


def test_spec_accepts_right_drafts_and_rolls_back_wrong_ones(tiny_checkpoint, plain, monkeypatch):
    OracleDrafter.truth = {tuple(p): ref for p, ref in zip(_prompts(), plain)}
    monkeypatch.setattr("moed.engine.llm_engine.MTPDrafter", OracleDrafter)
    e = _engine(tiny_checkpoint, spec_steps=3, kv_pages=40)
    assert isinstance(e.drafter, OracleDrafter)
    assert e.generate(_prompts(), GREEDY) == plain
    s = e.stats()
    assert s.spec_accepted_tokens > s.spec_draft_tokens // 3  # most steps keep several drafts
    assert s.num_steps < len(LENGTHS) * GREEDY.max_tokens  # so fewer steps than tokens
    # Stops and max_tokens land inside accepted drafts: the output is cut exactly there.
    ref = plain[1]
    e.add_request("stop", _prompts()[1], SamplingParams(max_tokens=12, stop_token_ids=[ref[5]], ignore_eos=True))
    e.add_request("len", _prompts()[1], SamplingParams(max_tokens=4, ignore_eos=True))
    got: dict[str, list[int]] = {"stop": [], "len": []}
    reasons = {}
    while e.has_unfinished:
        for o in e.step():
            got[o.request_id] += o.new_token_ids
            reasons[o.request_id] = o.finish_reason
    assert got["stop"] == ref[: ref.index(ref[5]) + 1] and reasons["stop"] == "stop"
    assert got["len"] == ref[:4] and reasons["len"] == "length"
    assert e.kv.num_free == e.kv.num_pages


def test_spec_with_preemption_keeps_greedy_tokens(tiny_checkpoint, plain):
    e = _engine(tiny_checkpoint, spec_steps=2, kv_pages=16)
    assert e.generate(_prompts(), GREEDY) == plain
    assert e.scheduler.num_preemptions > 0


def test_spec_seeded_sampling_reproduces(tiny_checkpoint):
    e = _engine(tiny_checkpoint, spec_steps=2)
    prompts = _prompts(seed=5)
    params = [
        SamplingParams(temperature=0.9, top_k=40, seed=7 + i, max_tokens=8, ignore_eos=True)
        for i in range(len(prompts))
    ]
    alone = [e.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert e.generate(prompts, params) == alone
    assert all(len(a) == 8 for a in alone)


def test_spec_rejection_sampling_keeps_the_target_distribution():
    """Each emitted token must be distributed as the target's p whatever the draft's q (S independent seeds)."""
    V, K, S = 6, 2, 12000
    p_logits = torch.log(
        torch.tensor(
            [
                [0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                [0.05, 0.05, 0.30, 0.30, 0.20, 0.10],
                [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],
            ]
        )
    )
    q_logits = torch.log(torch.tensor([[0.10, 0.50, 0.10, 0.10, 0.10, 0.10], [0.05, 0.05, 0.40, 0.20, 0.20, 0.10]]))
    sp = SamplingParams(temperature=1.0)
    sampler = Sampler()
    seeds = list(range(50_000, 50_000 + S))
    # Drafts drawn from q with the drafter's own noise stream.
    q_rows = SamplingTensors.build([SamplingRow(sp, s, 0, [1], []) for s in seeds], V, torch.device("cpu"))
    q = sampling_probs(q_logits[0].expand(S, V).clone(), q_rows)
    d1 = sampler.race(q, row_keys(q_rows.seeds, q_rows.out_index, STREAM_DRAFT))
    q2 = sampling_probs(q_logits[1].expand(S, V).clone(), q_rows)
    d2 = sampler.race(q2, row_keys(q_rows.seeds, q_rows.out_index + 1, STREAM_DRAFT))
    rows = [SamplingRow(sp, s, i, [1], []) for s in seeds for i in range(K + 1)]
    t = SamplingTensors.build(rows, V, torch.device("cpu"))
    logits = p_logits.repeat(S, 1)
    res = verify_drafts(
        sampler,
        logits,
        t,
        [K] * S,
        torch.stack([d1, d2], 1).tolist(),
        [torch.stack([q[s], q2[s]]) for s in range(S)],
        [False] * S,
    )
    n = torch.tensor(res.num_accepted)
    first = torch.where(n > 0, d1, torch.tensor(res.final_token))
    p0 = p_logits[0].exp()
    freq = torch.bincount(first, minlength=V).double() / S
    assert ((freq - p0).abs() <= 4.5 * (p0 * (1 - p0) / S).sqrt() + 1e-4).all(), (freq, p0)
    # The first draft is kept with probability sum(min(p, q)).
    accept_rate = (n > 0).double().mean().item()
    expected = torch.minimum(p0, q_logits[0].exp()).sum().item()
    assert abs(accept_rate - expected) < 4.5 * (expected * (1 - expected) / S) ** 0.5
    # Where the first draft was kept, the second token (draft or correction) follows p_1.
    second = torch.where(n > 1, d2, torch.tensor(res.final_token))[n > 0]
    p1 = p_logits[1].exp()
    freq2 = torch.bincount(second, minlength=V).double() / second.numel()
    assert ((freq2 - p1).abs() <= 4.5 * (p1 * (1 - p1) / second.numel()).sqrt() + 1e-4).all(), (freq2, p1)


@pytest.mark.parametrize("spec_steps", [0, 1])
def test_nonfinite_logits_stop_only_their_request_with_an_error(tiny_checkpoint, spec_steps):
    """A row of NaN logits (a kernel fault) is no token: its request stops with an error naming the fault and is
    counted; the other request in the same steps keeps its exact tokens; nothing leaks (plain and verify steps)."""
    e = _engine(tiny_checkpoint, spec_steps=spec_steps)
    prompts = _prompts()[:2]
    want = [_engine(tiny_checkpoint).generate([p], GREEDY)[0] for p in prompts]
    real, calls = e.runner.logits, [0]

    def poisoned(hidden):
        out = real(hidden)
        calls[0] += 1
        if calls[0] == 3:  # a decode step's logits, the first row's (whichever request it is) NaN
            out = out.clone()
            out[0] = float("nan")
        return out

    e.runner.logits = poisoned
    for i, p in enumerate(prompts):
        e.add_request(str(i), p, GREEDY)
    outs: dict[str, list] = {"0": [], "1": []}
    while e.has_unfinished:
        for o in e.step():
            outs[o.request_id].append(o)
    for o in e.flush():
        outs[o.request_id].append(o)
    failed = [rid for rid, os in outs.items() if os[-1].finish_reason == "error"]
    assert len(failed) == 1 and "numerical fault" in outs[failed[0]][-1].error
    ok = "1" if failed == ["0"] else "0"
    assert [t for o in outs[ok] for t in o.new_token_ids] == want[int(ok)]
    assert e.stats().numerical_faults == 1
    assert e.kv.num_free == e.kv.num_pages
