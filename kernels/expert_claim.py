"""Expert-cache bookkeeping on the GPU without a host round trip: which slot holds which expert, and which experts
a step must copy in.

`claim_slots` (one program; its plain-torch reference `claim_slots_reference` beside it) maps a step's routed expert
ids to slots, picks victims for the missing experts by the eviction policy, updates the tables and writes the copy
list that kernels/expert_copy.py's `copy_experts` reads. A slot is never claimed while it is pinned or holds an
expert this round computes with. When a step needs more experts than there are unpinned slots, it is served in
rounds (`round_idx` 0, 1, ...): each round serves what fits, writes `round_ids` (the expert id for routes served this
round, the dummy id E otherwise) and a route mask; later rounds may evict experts earlier rounds already used. The
count of copies stays on the device, so no host sync is needed and a step can be captured in a CUDA graph.

Buffers (`SlotTables`, one set per MoE layer; E experts, S slots):
  expert_to_slot [E + 1] int32   slot of each expert, -1 = absent; entry E (the dummy id) is slot 0
  slot_to_expert [S] int32       expert in each slot, -1 = empty
  slot_last_use  [S] int64       step that last used the slot (LRU key)
  slot_pinned    [S] int8        1 = never evicted
  expert_freq    [E] fp32        decayed activation count (decayed-LFU key): f = f * decay + count
  expert_count   [E] int64       activations since the placement manager last read them
  step           [1] int64       steps served (incremented by round 0)
  counts         [E] int32       this step's routes per expert (scratch written by round 0)
  served         [E] int8        experts served in an earlier round of this step (scratch)
  copy_expert / copy_slot [S] int32, n_copy [1] int32: the current copy list
  stats          [4] int64       hits, misses copied, evictions, steps
Victim order: empty slots, then slots unused this step by policy key (LRU: last use; LFU: decayed
frequency), then slots an earlier round of this step used; ties by slot index. Misses are served
in ascending order of their value (LRU: this step's routes to the expert; LFU: its decayed frequency
counting this step), ties by id, so a step that takes several rounds ends with its most valuable
experts resident (ops/bench/hitrate.py measures what that is worth at batch 32).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

LRU, LFU = 0, 1
POLICIES = {"lru": LRU, "lfu": LFU}
STATS = ("hits", "misses", "evictions", "steps")
# A round's per-route ids and mask: written by the claim kernel's one program for decode-sized steps (no second
# launch inside the graphs), by a grid of ROUTES_BLOCK-route programs past this many routes: one program walked a
# 32k-token prefill's 262k routes in every one of its ~20 rounds (H100: ~180 ms a layer beyond copies and compute).
ROUTES_IN_CLAIM_MAX = 4096
ROUTES_BLOCK = 1024
_LOCKED = tl.constexpr((1 << 63) - 1)  # key of a slot that cannot be evicted, or of an expert that is no miss


@dataclasses.dataclass
class SlotTables:
    """The device-side state of one layer's slot pool (see the module docstring for each buffer)."""

    expert_to_slot: torch.Tensor
    slot_to_expert: torch.Tensor
    slot_last_use: torch.Tensor
    slot_pinned: torch.Tensor
    expert_freq: torch.Tensor
    expert_count: torch.Tensor
    step: torch.Tensor
    counts: torch.Tensor
    served: torch.Tensor
    copy_expert: torch.Tensor
    copy_slot: torch.Tensor
    n_copy: torch.Tensor
    stats: torch.Tensor
    sort_scratch: torch.Tensor
    miss_scratch: torch.Tensor
    flag_scratch: torch.Tensor

    @classmethod
    def allocate(cls, num_experts: int, num_slots: int, device: torch.device | str) -> SlotTables:
        if num_slots < 1 or num_experts < 1:
            raise ValueError(f"slot pool needs >= 1 expert and slot, got {num_experts} experts, {num_slots} slots")
        if num_slots > num_experts:
            raise ValueError(f"{num_slots} slots for {num_experts} experts: at most one slot per expert")
        if num_slots >= 1 << 16 or num_experts >= 1 << 16:
            raise ValueError(f"{num_experts} experts, {num_slots} slots: the sort keys hold indices below 65536")
        E, S, d = num_experts, num_slots, device
        i32 = dict(dtype=torch.int32, device=d)
        e2s = torch.full((E + 1,), -1, **i32)
        e2s[E] = 0
        return cls(
            expert_to_slot=e2s,
            slot_to_expert=torch.full((S,), -1, **i32),
            slot_last_use=torch.zeros(S, dtype=torch.int64, device=d),
            slot_pinned=torch.zeros(S, dtype=torch.int8, device=d),
            expert_freq=torch.zeros(E, dtype=torch.float32, device=d),
            expert_count=torch.zeros(E, dtype=torch.int64, device=d),
            step=torch.zeros(1, dtype=torch.int64, device=d),
            counts=torch.zeros(E, **i32),
            served=torch.zeros(E, dtype=torch.int8, device=d),
            copy_expert=torch.zeros(S, **i32),
            copy_slot=torch.zeros(S, **i32),
            n_copy=torch.zeros(1, **i32),
            stats=torch.zeros(len(STATS), dtype=torch.int64, device=d),
            sort_scratch=torch.zeros(triton.next_power_of_2(S), dtype=torch.int64, device=d),
            miss_scratch=torch.zeros(triton.next_power_of_2(E + 1), dtype=torch.int64, device=d),
            flag_scratch=torch.zeros(E + 1, dtype=torch.int8, device=d),
        )

    @property
    def num_experts(self) -> int:
        return self.expert_freq.numel()

    @property
    def num_slots(self) -> int:
        return self.slot_to_expert.numel()

    def clone(self) -> SlotTables:
        return SlotTables(**{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)})


# ---------------------------------------------------------------------------------------------- claim


@triton.jit
def _route_counts(ids_ptr, R, offs_e, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ids = tl.load(ids_ptr + offs_r, mask=offs_r < R, other=-1)
        counts += tl.sum((ids[None, :] == offs_e[:, None]).to(tl.int32), axis=1)
    return counts


@triton.jit
def _round_routes(ids_ptr, flag_ptr, round_ids_ptr, route_mask_ptr, offs_r, R, E):
    """Routes offs_r of the step: their id where this round serves the expert (flag set), else the dummy id E."""
    rmask = offs_r < R
    ids = tl.load(ids_ptr + offs_r, mask=rmask, other=0)
    flag = tl.load(flag_ptr + ids, mask=rmask, other=0)
    tl.store(round_ids_ptr + offs_r, tl.where(flag != 0, ids, E), mask=rmask)
    tl.store(route_mask_ptr + offs_r, flag, mask=rmask)


@triton.jit(do_not_specialize=["R", "E"])
def _round_routes_kernel(ids_ptr, flag_ptr, round_ids_ptr, route_mask_ptr, R, E, BLOCK_R: tl.constexpr):
    _round_routes(
        ids_ptr, flag_ptr, round_ids_ptr, route_mask_ptr, tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R), R, E
    )


@triton.jit(do_not_specialize=["R", "E", "S", "round_idx"])
def _claim_kernel(
    ids_ptr,
    R,
    E,
    S,
    round_idx,
    decay,
    e2s_ptr,
    s2e_ptr,
    last_ptr,
    pinned_ptr,
    freq_ptr,
    ecount_ptr,
    step_ptr,
    counts_ptr,
    served_ptr,
    exclude_ptr,
    sort_ptr,
    miss_ptr,
    flag_ptr,
    copy_e_ptr,
    copy_s_ptr,
    n_copy_ptr,
    stats_ptr,
    round_ids_ptr,
    route_mask_ptr,
    POLICY: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    ROUTES_HERE: tl.constexpr,  # write round_ids / route_mask here (else `_round_routes_kernel` does, in parallel)
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < E
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < S
    first = round_idx == 0
    step = tl.load(step_ptr) + first.to(tl.int64)

    # Routes per expert: computed once per step (round 0), reused by later rounds.
    if first:
        counts = _route_counts(ids_ptr, R, offs_e, BLOCK_E, BLOCK_R)
    else:
        counts = tl.load(counts_ptr + offs_e, mask=emask, other=0)
    served = tl.load(served_ptr + offs_e, mask=emask, other=1).to(tl.int32)
    served = tl.where(first, 0, served)
    needed = (counts > 0) & (served == 0) & emask
    if HAS_EXCLUDE:
        needed = needed & (tl.load(exclude_ptr + offs_e, mask=emask, other=0) == 0)
    slot = tl.load(e2s_ptr + offs_e, mask=emask, other=-1)
    hit = needed & (slot >= 0)
    miss = needed & (slot < 0)
    freq = tl.load(freq_ptr + offs_e, mask=emask, other=0.0)
    new_freq = tl.where(first, freq * decay + counts.to(tl.float32), freq)  # round 0 folds this step in (below)

    # Victim keys: (tier, policy score, slot); slots holding an expert of this round are locked.
    tl.store(flag_ptr + offs_e, hit.to(tl.int8), mask=emask)
    tl.debug_barrier()
    s2e = tl.load(s2e_ptr + offs_s, mask=smask, other=-1)
    holds = s2e >= 0
    locked = tl.load(flag_ptr + s2e, mask=smask & holds, other=0) != 0
    pinned = tl.load(pinned_ptr + offs_s, mask=smask, other=1) != 0
    last = tl.load(last_ptr + offs_s, mask=smask, other=0)
    evictable = smask & (pinned == 0) & (locked == 0)
    tier = tl.where(holds, tl.where(last < step, 1, 2), 0).to(tl.int64)
    if POLICY == 0:
        score = last
    else:
        f = tl.load(freq_ptr + s2e, mask=smask & holds, other=0.0)
        score = f.to(tl.int32, bitcast=True).to(tl.int64)
    score = tl.where(holds, score, 0)
    key = (tier << 56) | (score << 16) | offs_s.to(tl.int64)
    key = tl.where(evictable, key, _LOCKED)
    tl.store(sort_ptr + offs_s, tl.sort(key))
    n_evictable = tl.sum(evictable.to(tl.int32))
    # Misses by value, least valuable first (a non-negative fp32's bits order like its value), ties by id.
    if POLICY == 0:
        value = counts.to(tl.int64)
    else:
        value = new_freq.to(tl.int32, bitcast=True).to(tl.int64)
    mkey = tl.where(miss, (value << 16) | offs_e.to(tl.int64), _LOCKED)
    tl.store(miss_ptr + offs_e, tl.sort(mkey))
    n_take = tl.minimum(tl.sum(miss.to(tl.int32)), n_evictable)
    tl.debug_barrier()

    # The j-th least valuable miss takes the j-th victim (j = offs_e as a rank here).
    take = offs_e < n_take
    e_new = (tl.load(miss_ptr + offs_e, mask=take, other=0) & 0xFFFF).to(tl.int32)
    victim = (tl.load(sort_ptr + offs_e, mask=take, other=0) & 0xFFFF).to(tl.int32)
    old = tl.load(s2e_ptr + victim, mask=take, other=-1)
    tl.store(e2s_ptr + old, -1, mask=take & (old >= 0))
    tl.store(e2s_ptr + e_new, victim, mask=take)
    tl.store(s2e_ptr + victim, e_new, mask=take)
    tl.store(last_ptr + victim, step, mask=take)
    tl.store(copy_e_ptr + offs_e, e_new, mask=take)
    tl.store(copy_s_ptr + offs_e, victim, mask=take)
    tl.store(flag_ptr + e_new, tl.full([BLOCK_E], 1, dtype=tl.int8), mask=take)  # flags: hit | taken
    n_evicted = tl.sum((take & (old >= 0)).to(tl.int64))
    tl.store(n_copy_ptr, n_take)
    tl.store(stats_ptr + 2, tl.load(stats_ptr + 2) + n_evicted)
    tl.store(last_ptr + slot, step, mask=hit)
    tl.store(stats_ptr + 1, tl.load(stats_ptr + 1) + n_take.to(tl.int64))
    tl.debug_barrier()

    in_round = tl.load(flag_ptr + offs_e, mask=emask, other=0) != 0
    tl.store(served_ptr + offs_e, ((served != 0) | in_round).to(tl.int8), mask=emask)
    if ROUTES_HERE:
        for r0 in range(0, R, BLOCK_R):
            _round_routes(ids_ptr, flag_ptr, round_ids_ptr, route_mask_ptr, r0 + tl.arange(0, BLOCK_R), R, E)
    if first:
        tl.store(step_ptr, step)
        tl.store(counts_ptr + offs_e, counts, mask=emask)
        tl.store(freq_ptr + offs_e, new_freq, mask=emask)
        ec = tl.load(ecount_ptr + offs_e, mask=emask, other=0)
        tl.store(ecount_ptr + offs_e, ec + counts.to(tl.int64), mask=emask)
        tl.store(stats_ptr + 0, tl.load(stats_ptr + 0) + tl.sum(hit.to(tl.int64)))
        tl.store(stats_ptr + 3, tl.load(stats_ptr + 3) + 1)


def claim_slots(
    t: SlotTables,
    topk_ids: torch.Tensor,
    round_idx: int,
    round_ids: torch.Tensor,
    route_mask: torch.Tensor,
    policy: int = LRU,
    decay: float = 0.95,
    exclude: torch.Tensor | None = None,
) -> None:
    """Claim slots for the experts of `topk_ids` ([tokens, k] int32, on the tables' device).

    Writes `t.copy_expert/copy_slot/n_copy`, `round_ids` ([tokens, k] int32) and `route_mask`
    ([tokens, k] int8). `exclude` ([E] int8): experts served elsewhere (the CPU).
    """
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        raise TypeError(f"topk_ids must be int32, got {ids.dtype}")
    E, S = t.num_experts, t.num_slots
    here = ids.numel() <= ROUTES_IN_CLAIM_MAX
    _claim_kernel[(1,)](
        ids,
        ids.numel(),
        E,
        S,
        round_idx,
        decay,
        t.expert_to_slot,
        t.slot_to_expert,
        t.slot_last_use,
        t.slot_pinned,
        t.expert_freq,
        t.expert_count,
        t.step,
        t.counts,
        t.served,
        exclude if exclude is not None else t.served,
        t.sort_scratch,
        t.miss_scratch,
        t.flag_scratch,
        t.copy_expert,
        t.copy_slot,
        t.n_copy,
        t.stats,
        round_ids,
        route_mask,
        POLICY=policy,
        HAS_EXCLUDE=exclude is not None,
        ROUTES_HERE=here,
        BLOCK_E=triton.next_power_of_2(E + 1),
        BLOCK_S=triton.next_power_of_2(S),
        BLOCK_R=max(16, min(64, triton.next_power_of_2(ids.numel()))),
        num_warps=4,
    )
    if not here:
        R = ids.numel()
        _round_routes_kernel[(triton.cdiv(R, ROUTES_BLOCK),)](
            ids, t.flag_scratch, round_ids, route_mask, R, E, BLOCK_R=ROUTES_BLOCK, num_warps=4
        )


def claim_slots_reference(
    t: SlotTables,
    topk_ids: torch.Tensor,
    round_idx: int,
    round_ids: torch.Tensor,
    route_mask: torch.Tensor,
    policy: int = LRU,
    decay: float = 0.95,
    exclude: torch.Tensor | None = None,
) -> None:
    """Plain-torch `claim_slots`: same semantics, same victim and miss order, same buffers updated."""
    ids = topk_ids.reshape(-1).long().cpu()
    E, S = t.num_experts, t.num_slots
    dev = t.step.device
    first = round_idx == 0
    step = int(t.step.item()) + int(first)
    counts = torch.bincount(ids, minlength=E).to(torch.int32) if first else t.counts.cpu()
    served = torch.zeros(E, dtype=torch.bool) if first else t.served.cpu() != 0
    needed = (counts > 0) & ~served
    if exclude is not None:
        needed &= exclude.cpu() == 0
    e2s = t.expert_to_slot[:E].cpu()
    hit = needed & (e2s >= 0)
    miss = needed & (e2s < 0)
    freq = t.expert_freq.cpu()
    new_freq = freq * decay + counts.float() if first else freq
    # Victims: (tier, policy score, slot) over evictable slots; a fp32 key compares as its int32 bits.
    s2e, last, pinned = t.slot_to_expert.tolist(), t.slot_last_use.tolist(), t.slot_pinned.tolist()
    hits, freq_bits = set(hit.nonzero().flatten().tolist()), freq.view(torch.int32).tolist()
    keys = []
    for s in range(S):
        e = s2e[s]
        if pinned[s] or e in hits:
            continue
        if e < 0:
            keys.append((0, 0, s))
        else:
            keys.append((1 if last[s] < step else 2, last[s] if policy == LRU else freq_bits[e], s))
    victims = [s for _, _, s in sorted(keys)]
    # Misses: least valuable first (LRU: this step's routes; LFU: decayed frequency counting this step), ties by id.
    value = counts.tolist() if policy == LRU else new_freq.view(torch.int32).tolist()
    misses = sorted(miss.nonzero().flatten().tolist(), key=lambda e: (value[e], e))
    copies = list(zip(misses, victims))
    evicted = [s2e[s] for _, s in copies if s2e[s] >= 0]
    if copies:
        new_e = torch.tensor([e for e, _ in copies], device=dev)
        new_s = torch.tensor([s for _, s in copies], device=dev)
        if evicted:
            t.expert_to_slot[torch.tensor(evicted, device=dev)] = -1
        t.expert_to_slot[new_e] = new_s.to(torch.int32)
        t.slot_to_expert[new_s] = new_e.to(torch.int32)
        t.slot_last_use[new_s] = step
        t.copy_expert[: len(copies)] = new_e.to(torch.int32)
        t.copy_slot[: len(copies)] = new_s.to(torch.int32)
    t.n_copy.fill_(len(copies))
    t.stats[2] += len(evicted)
    t.slot_last_use[e2s[hit].to(dev).long()] = step
    t.stats[1] += len(copies)
    in_round = hit.clone()
    for e, _ in copies:
        in_round[e] = True
    t.served.copy_((served | in_round).to(torch.int8))
    flag = in_round[ids]
    round_ids.view(-1).copy_(torch.where(flag, ids, E).to(torch.int32))
    route_mask.view(-1).copy_(flag.to(torch.int8))
    if first:
        t.step.fill_(step)
        t.counts.copy_(counts)
        t.expert_freq.copy_(new_freq)
        t.expert_count += counts.to(torch.int64).to(dev)
        t.stats[0] += int(hit.sum())
        t.stats[3] += 1
