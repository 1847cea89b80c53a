"""The batched sampler against per-row plain-Python references, and the counter-based noise."""

from __future__ import annotations

import math
import random

import torch

from moed.engine.protocol import SamplingParams
from moed.engine.sampler import (
    STREAM_SAMPLE,
    Sampler,
    SamplingRow,
    SamplingTensors,
    _mul32,
    apply_penalties,
    mix32,
    row_keys,
    sampling_probs,
)

CPU = torch.device("cpu")


def _rows(params: list[SamplingParams], seeds=None, outputs=None, prompts=None) -> list[SamplingRow]:
    n = len(params)
    seeds = seeds or list(range(n))
    outputs = outputs or [[] for _ in range(n)]
    prompts = prompts or [[1] for _ in range(n)]
    return [SamplingRow(p, s, len(o), pr, o) for p, s, o, pr in zip(params, seeds, outputs, prompts)]


def test_sampling_mul32_is_exact_modular_multiplication():
    rng = random.Random(0)
    xs = [0, 1, 0xFFFFFFFF, 0x80000000] + [rng.getrandbits(32) for _ in range(1000)]
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 3):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % (1 << 32) for x in xs]


def test_sampling_noise_is_uniform_and_keyed():
    keys = row_keys(torch.arange(64, dtype=torch.int64) * 7919, torch.zeros(64, dtype=torch.int64), STREAM_SAMPLE)
    assert len(set(keys.tolist())) == 64
    bits = mix32(keys[:, None] ^ mix32(torch.arange(4096, dtype=torch.int64))[None, :])
    u = ((bits >> 8).double() + 0.5) / (1 << 24)
    assert abs(u.mean().item() - 0.5) < 0.005
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 50, chi2  # 15 degrees of freedom: p < 1e-5 above 45
    # Neighbouring counters and streams give unrelated keys.
    k2 = row_keys(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 1, 0]), STREAM_SAMPLE)
    k3 = row_keys(torch.zeros(1, dtype=torch.int64), torch.tensor([0]), STREAM_SAMPLE + 1)
    assert len({*k2.tolist()[:2], k3.item()}) == 3 and k2[0] == k2[2]


def test_sampling_draws_follow_the_distribution():
    V, R = 8, 20000
    logits = torch.log(torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01]))
    rows = _rows([SamplingParams(temperature=1.0)] * R, seeds=list(range(1000, 1000 + R)))
    t = SamplingTensors.build(rows, V, CPU)
    tokens = Sampler()(logits.expand(R, V).clone(), t).token_ids
    freq = torch.bincount(tokens, minlength=V).double() / R
    p = logits.exp().double()
    # 4.5 standard deviations of a binomial proportion: deterministic (fixed seeds) and far from flaky.
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / R).sqrt() + 1e-4).all(), (freq, p)


def test_sampling_seed_reproduces_whatever_the_batch():
    V = 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    sp = SamplingParams(temperature=0.9, top_p=0.95)
    s = Sampler()
    alone = [
        s(logits[i : i + 1], SamplingTensors.build(_rows([sp], seeds=[77 + i]), V, CPU)).token_ids.item()
        for i in range(6)
    ]
    perm = [3, 0, 5, 1, 4, 2]
    mixed_params = [sp if i % 2 == 0 else SamplingParams(temperature=0.5, top_k=3) for i in range(6)]
    batch = s(
        logits[perm],
        SamplingTensors.build(_rows([mixed_params[i] for i in perm], seeds=[77 + i for i in perm]), V, CPU),
    ).token_ids.tolist()
    for j, i in enumerate(perm):
        if i % 2 == 0:
            assert batch[j] == alone[i]
    other_seed = [
        s(logits[:1], SamplingTensors.build(_rows([sp], seeds=[seed]), V, CPU)).token_ids.item() for seed in range(40)
    ]
    assert len(set(other_seed)) > 3  # different seeds really draw differently


def _ref_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Plain-Python reference for one row: temperature, top-k, top-p, min-p."""
    V = len(logits)
    scaled = [x / p.temperature for x in logits]
    order = sorted(range(V), key=lambda i: -scaled[i])
    keep = set(order[: p.top_k] if p.top_k else order)
    if p.top_p < 1.0:
        kept = [i for i in order if i in keep]
        m = max(scaled[i] for i in kept)
        z = sum(math.exp(scaled[i] - m) for i in kept)
        mass, nucleus = 0.0, set()
        for i in kept:
            if mass >= p.top_p:
                break
            nucleus.add(i)
            mass += math.exp(scaled[i] - m) / z
        keep = nucleus
    m = max(scaled[i] for i in keep)
    w = [math.exp(scaled[i] - m) if i in keep else 0.0 for i in range(V)]
    z = sum(w)
    probs = [x / z for x in w]
    if p.min_p > 0:
        top = max(probs)
        probs = [x if x >= p.min_p * top else 0.0 for x in probs]
        z = sum(probs)
        probs = [x / z for x in probs]
    return probs


def test_sampling_filters_match_reference():
    V = 40
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, V, generator=g, dtype=torch.float64).float() * 2
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=1.0, top_k=7, top_p=0.9, min_p=0.1),
    ]
    probs = sampling_probs(logits, SamplingTensors.build(_rows(params), V, CPU))
    for i, p in enumerate(params):
        ref = torch.tensor(_ref_probs(logits[i].tolist(), p))
        assert torch.allclose(probs[i].double(), ref.double(), atol=1e-5), (i, p)
    # top-k alone takes the topk() path rather than the sort path: same answer.
    only_k = [SamplingParams(temperature=1.0, top_k=k) for k in (1, 3, 40, 0)]
    probs = sampling_probs(logits[:4], SamplingTensors.build(_rows(only_k), V, CPU))
    for i, p in enumerate(only_k):
        assert torch.allclose(probs[i].double(), torch.tensor(_ref_probs(logits[i].tolist(), p)).double(), atol=1e-5)


def test_sampling_penalties_match_reference():
    V = 12
    logits = torch.linspace(-3, 3, V).repeat(3, 1)
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    prompts = [[0, 11], [1], [2]]
    outputs = [[5, 5, 10], [5, 5, 10], [5]]
    t = SamplingTensors.build(_rows(params, prompts=prompts, outputs=outputs), V, CPU)
    out = apply_penalties(logits, t)
    ref = logits.clone()
    for j in (0, 11, 5, 10):
        ref[0, j] = ref[0, j] / 1.5 if ref[0, j] > 0 else ref[0, j] * 1.5
    ref[1, 5] -= 2 * 0.5 + 0.25
    ref[1, 10] -= 0.5 + 0.25
    assert torch.allclose(out, ref)


def test_sampling_greedy_rows_take_the_penalised_argmax_and_logprobs_are_raw():
    V = 16
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g)
    best = logits[1].argmax().item()
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(repetition_penalty=100.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    res = Sampler()(logits, SamplingTensors.build(_rows(params, outputs=[[], [best], []]), V, CPU))
    assert res.token_ids[0] == logits[0].argmax()
    assert res.token_ids[1] != best  # the penalty moved the greedy choice away from the repeated token
    lp = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(res.logprobs, lp.gather(1, res.token_ids[:, None])[:, 0])
    assert res.top_ids[0].tolist() == lp[0].topk(3).indices.tolist()
