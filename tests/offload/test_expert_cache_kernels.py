"""Claim / copy / upload kernels (Triton, interpreter on CPU) against their torch references."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moed.kernels import expert_claim
from moed.kernels.expert_claim import LFU, LRU, SlotTables, claim_slots, claim_slots_reference
from moed.kernels.expert_copy import (
    copy_expert_columns,
    copy_expert_columns_reference,
    copy_experts,
    copy_experts_reference,
    upload_no_ce,
)


def _random_state(E: int, S: int, g: torch.Generator) -> SlotTables:
    t = SlotTables.allocate(E, S, "cpu")
    resident = torch.randperm(E, generator=g)[: torch.randint(0, S + 1, (1,), generator=g).item()]
    for s, e in enumerate(resident.tolist()):
        t.expert_to_slot[e], t.slot_to_expert[s] = s, e
    t.slot_last_use.copy_(torch.randint(0, 5, (S,), generator=g))
    t.step.fill_(5)
    t.expert_freq.copy_(torch.rand(E, generator=g) * 3)
    pinned = torch.rand(S, generator=g) < 0.25
    t.slot_pinned.copy_((pinned & (t.slot_to_expert >= 0)).to(torch.int8))
    return t


def _assert_same(a: SlotTables, b: SlotTables) -> None:
    n = int(a.n_copy)
    assert n == int(b.n_copy)
    for f in dataclasses.fields(a):
        if f.name in ("sort_scratch", "miss_scratch", "flag_scratch"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("copy_expert", "copy_slot"):
            x, y = x[:n], y[:n]
        assert torch.equal(x, y), f.name


@pytest.mark.parametrize("routes_in_claim", [True, False], ids=["routes-in-claim", "routes-in-grid"])
@pytest.mark.parametrize("policy", [LRU, LFU])
@pytest.mark.parametrize("E,S,M,k", [(16, 5, 3, 4), (9, 9, 2, 3), (32, 1, 1, 2), (12, 7, 5, 6)])
def test_expert_cache_claim_kernel_matches_reference(policy, E, S, M, k, routes_in_claim, monkeypatch):
    # long steps write their per-route ids from a grid of programs after the claim: both ways, the same buffers
    monkeypatch.setattr(expert_claim, "ROUTES_IN_CLAIM_MAX", 1 << 30 if routes_in_claim else 0)
    monkeypatch.setattr(expert_claim, "ROUTES_BLOCK", 16)
    g = torch.Generator().manual_seed(E * 100 + S + policy)
    a = _random_state(E, S, g)
    b = a.clone()
    for step in range(3):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int32)
        exclude = (torch.rand(E, generator=g) < 0.2).to(torch.int8) if step == 1 else None
        unpinned = S - int(a.slot_pinned.sum())
        rounds = -(-min(E, M * k) // max(unpinned, 1))
        served = torch.zeros(E, dtype=torch.bool)
        for r in range(rounds):
            ra, rb = torch.empty_like(ids), torch.empty_like(ids)
            ma, mb = torch.empty(M, k, dtype=torch.int8), torch.empty(M, k, dtype=torch.int8)
            claim_slots(a, ids, r, ra, ma, policy=policy, exclude=exclude)
            claim_slots_reference(b, ids, r, rb, mb, policy=policy, exclude=exclude)
            _assert_same(a, b)
            assert torch.equal(ra, rb) and torch.equal(ma, mb)
            assert torch.equal(ra[ma == 0], torch.full_like(ra[ma == 0], E))  # unserved routes take the dummy id
            served[ids[ma != 0].long()] = True
        want = torch.zeros(E, dtype=torch.bool)
        want[ids.flatten().long()] = True
        if exclude is not None:
            want &= exclude == 0
        if unpinned > 0:
            assert torch.equal(served, want), "every needed expert is served within the rounds bound"
        # Tables stay a bijection between resident experts and filled slots.
        e2s, s2e = a.expert_to_slot[:E], a.slot_to_expert
        for e in range(E):
            if e2s[e] >= 0:
                assert s2e[e2s[e]] == e
        assert int(a.expert_to_slot[E]) == 0


def test_expert_cache_claim_never_evicts_pinned_or_in_round_slots():
    g = torch.Generator().manual_seed(3)
    t = SlotTables.allocate(20, 6, "cpu")
    for s, e in enumerate([0, 1, 2, 3, 4, 5]):
        t.expert_to_slot[e], t.slot_to_expert[s] = s, e
    t.slot_pinned[0] = 1
    for _ in range(10):
        ids = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(2)]).to(torch.int32)
        hits = {e for e in ids.flatten().tolist() if t.expert_to_slot[e] >= 0}
        hit_slots = {int(t.expert_to_slot[e]) for e in hits}
        ri, m = torch.empty_like(ids), torch.empty(ids.shape, dtype=torch.int8)
        claim_slots(t, ids, 0, ri, m)
        victims = set(t.copy_slot[: int(t.n_copy)].tolist())
        assert 0 not in victims and not victims & hit_slots
        assert int(t.slot_to_expert[0]) == 0


def test_expert_cache_lru_and_lfu_pick_different_victims():
    t = SlotTables.allocate(8, 2, "cpu")
    t.expert_to_slot[0], t.slot_to_expert[0] = 0, 0
    t.expert_to_slot[1], t.slot_to_expert[1] = 1, 1
    t.slot_last_use.copy_(torch.tensor([1, 2]))  # expert 0 least recently used ...
    t.expert_freq.copy_(torch.tensor([9.0, 1.0, 0, 0, 0, 0, 0, 0]))  # ... but most frequent
    t.step.fill_(2)
    ids = torch.tensor([[5]], dtype=torch.int32)
    for policy, victim in ((LRU, 0), (LFU, 1)):
        c = t.clone()
        claim_slots(c, ids, 0, torch.empty_like(ids), torch.empty(1, 1, dtype=torch.int8), policy=policy)
        assert int(c.copy_slot[0]) == victim


@pytest.mark.parametrize("sizes", [(8192 + 48, 320, 64, 16), (8192 + 48, 320, 64, 16, 40, 8)])  # FP8, int4
def test_expert_cache_copy_kernel_matches_reference(sizes):
    g = torch.Generator().manual_seed(0)
    t = SlotTables.allocate(10, 4, "cpu")
    src = [torch.randint(0, 255, (10, n), dtype=torch.uint8, generator=g) for n in sizes]
    dst = [torch.zeros(4, s.shape[1], dtype=torch.uint8) for s in src]
    ids = torch.tensor([[7, 2, 9]], dtype=torch.int32)
    claim_slots(t, ids, 0, torch.empty_like(ids), torch.empty(1, 3, dtype=torch.int8))
    copy_experts(t, src, dst)
    ref = [torch.zeros_like(d) for d in dst]
    copy_experts_reference(t, src, ref)
    for a, b in zip(dst, ref):
        assert torch.equal(a, b)
    for j in range(3):
        e, s = int(t.copy_expert[j]), int(t.copy_slot[j])
        assert all(torch.equal(d[s], x[e]) for d, x in zip(dst, src))
    with pytest.raises(ValueError, match="2, 4 or 6 sections"):
        copy_experts(t, src[:3], dst[:3])


def test_expert_cache_upload_no_ce_and_table_errors():
    src = torch.arange(300, dtype=torch.int32)
    dst = torch.empty(300, dtype=torch.int32)
    upload_no_ce(src, dst)
    assert torch.equal(src, dst)
    with pytest.raises(ValueError, match="mismatch"):
        upload_no_ce(src, torch.empty(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at most one slot per expert"):
        SlotTables.allocate(4, 5, "cpu")
    with pytest.raises(TypeError, match="int32"):
        t = SlotTables.allocate(4, 2, "cpu")
        claim_slots(t, torch.zeros(1, 2, dtype=torch.int64), 0, None, None)


@pytest.mark.parametrize("policy", [LRU, LFU])
def test_expert_cache_rounds_end_with_the_most_valuable_experts(policy):
    # 4 experts needed, 2 slots: 2 rounds. Served least valuable first, the last round keeps the two most valuable:
    # by this step's routes under LRU (9 routes 3 times, 5 twice), by decayed frequency under LFU (2 and 4 have
    # history, so they outrank 9 and 5 even counting this step's routes).
    ids = torch.tensor([[9, 5, 2], [9, 5, 4], [9, 2, 5]], dtype=torch.int32)
    want = {9, 5} if policy == LRU else {2, 4}
    for claim in (claim_slots, claim_slots_reference):
        t = SlotTables.allocate(16, 2, "cpu")
        t.expert_freq[2], t.expert_freq[4] = 10.0, 10.0
        ri, m = torch.empty_like(ids), torch.empty(ids.shape, dtype=torch.int8)
        for r in range(2):
            claim(t, ids, r, ri, m, policy=policy)
        assert set(t.slot_to_expert.tolist()) == want, claim.__name__
        assert t.stats.tolist() == [0, 4, 2, 1]  # hits, misses, evictions, steps


@pytest.mark.parametrize("granule", [1, 64])
@pytest.mark.parametrize(("split", "seed"), [((5, 64), 0), ((2, 128), 1), ((-1, 64), 2)])
def test_offload_copy_expert_columns_matches_reference(split, seed, granule):
    """The partial copy of a column split: an FP8-like layout (w13 [2N, K] halves, w2 [K, N] rows, both scales) with
    N = 256 and 64-column blocks; the kernel against its reference from a scratch of stale bytes; the copied columns
    are the expert's, the zeroed section's tail is zero, and the rest keeps what it held. No split (-1): untouched."""
    g = torch.Generator().manual_seed(seed)
    E, K, N, blk = 6, 192, 256, 64
    shapes = [(2 * N, K), (K, N), (2 * N // blk, K // blk * 4), (K // blk, N // blk * 4)]  # scales as fp32 bytes
    rows = [2, K, 2, K // blk]
    zero = [False, False, True, False]
    src = [torch.randint(0, 256, (E, a * b), generator=g, dtype=torch.uint8) for a, b in shapes]
    stale = [torch.randint(1, 256, (1, a * b), generator=g, dtype=torch.uint8) for a, b in shapes]
    got, want = [t.clone() for t in stale], [t.clone() for t in stale]
    info = torch.tensor(split, dtype=torch.int32)
    copy_expert_columns(info, src, got, rows, zero, N, granule=granule)  # 64: 16- and 4-byte copies
    copy_expert_columns_reference(info, src, want, rows, zero, N)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    e, cols = split
    if e < 0:
        assert all(torch.equal(a, b) for a, b in zip(got, stale))
        return
    w13 = got[0].view(2, N, K)
    assert torch.equal(w13[:, :cols], src[0][e].view(2, N, K)[:, :cols]) and torch.equal(
        w13[:, cols:], stale[0].view(2, N, K)[:, cols:]
    )
    assert torch.equal(got[1].view(K, N)[:, :cols], src[1][e].view(K, N)[:, :cols])
    s13 = got[2].view(2, N // blk, -1)
    assert torch.equal(s13[:, : cols // blk], src[2][e].view(2, N // blk, -1)[:, : cols // blk])
    assert not s13[:, cols // blk :].any()
    with pytest.raises(ValueError, match="does not split into 7 rows"):
        copy_expert_columns(info, src, got, [2, 7, 2, 3], zero, N)
    with pytest.raises(ValueError, match="is not whole bytes"):
        copy_expert_columns(info, src, got, rows, zero, N, granule=3)
