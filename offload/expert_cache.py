"""The GPU expert cache: per-layer slot pools sized from a memory budget, their slot tables, pins, copies.

Each cached layer owns `S` slots holding experts in the host store's layout (see host_store.py), one pool per
section, stacked as the fused-MoE kernels take them:
  bf16 / FP8: w13 [S, 2N, K], w2 [S, K, N] (fp8 e4m3 or bf16); w13_scale [S, 2N/bn, ceil(K/bk)],
  w2_scale [S, ceil(K/bn), N/bk] fp32 (FP8 only);
  int4: w13 uint8 [S, 2N, K/2], w13_scale bf16 [S, 2N, G13], w13_zeros int32 [S, 2N/8, G13], and w2 uint8
  [S, K, N/2], w2_scale [S, K, G2], w2_zeros [S, K/8, G2] (a slot is about half an FP8 slot);
all zero-initialised, so every slot always holds finite weights (slot 0 serves the dummy id E of routes a round
does not compute; an all-zero int4 slot has q = z = -8 and scale 0).
The slot tables (`kernels.expert_claim.SlotTables`) live on the device and are read directly by the
fused-MoE kernel (`expert_to_slot`) and by the claim kernel. When a layer's experts all fit (S == E)
they are all loaded at start, the table is the identity and never changes: no claim, no copy.

Misses are copied by one of two paths: "sm" (the claim + UVA copy kernels, no host sync, CUDA-graph
capturable) or "ce" (the copy engine: the host reads the copy list, which syncs, and queues
cudaMemcpyAsync on a side stream; the main stream waits on an event). Bulk loads (start-up, pins)
always take the copy engine on the side stream.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from moed.kernels.act_quant import interpreting
from moed.kernels.expert_claim import POLICIES, SlotTables, claim_slots, claim_slots_reference
from moed.kernels.expert_copy import copy_experts, copy_experts_reference
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.pins import pin_budget

log = logging.getLogger(__name__)

COPY_PATHS = ("sm", "ce")


class CacheConfigError(ValueError):
    """A cache setting that cannot work; the message names the value and what is accepted."""


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    policy: str = "lru"  # "lru" | "lfu" (decayed-LFU)
    lfu_decay: float = 0.95  # per-step decay of the LFU frequency
    copy_path: str = "sm"  # per-step misses: "sm" (UVA kernel) | "ce" (copy engine, host sync)
    copy_programs: int = 32  # CTAs of the UVA copy kernel (51 GB/s measured with 32 on the H100)
    use_kernels: bool | None = None  # Triton kernels or their torch references (None: kernels_on decides)
    # Share of a layer's slots that may be pinned (`pin_budget`). A step's rounds are sized for that many pins from
    # the start, so pins set later never leave a captured decode graph with too few rounds (its routes unserved).
    pin_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise CacheConfigError(f"eviction policy '{self.policy}' unknown (choose from {', '.join(POLICIES)})")
        if self.copy_path not in COPY_PATHS:
            raise CacheConfigError(f"copy path '{self.copy_path}' unknown (choose from {', '.join(COPY_PATHS)})")
        if not 0.0 < self.lfu_decay <= 1.0:
            raise CacheConfigError(f"lfu_decay {self.lfu_decay} must be in (0, 1]")
        if not 0.0 <= self.pin_fraction <= 1.0:
            raise CacheConfigError(f"pin_fraction {self.pin_fraction} must be in [0, 1]")

    def kernels_on(self, device: torch.device) -> bool:
        """Whether the claim and copy steps run as Triton kernels: by default on CUDA and in the interpreter (the
        tests), else their torch references (Triton has no CPU backend to launch them on)."""
        if self.use_kernels is not None:
            return self.use_kernels
        return device.type == "cuda" or interpreting()


def slots_for_budget(budget_bytes: int, layout: ExpertLayout, num_layers: int) -> int:
    """Slots per layer that `budget_bytes` buys for `num_layers` layers (at least 1, at most E)."""
    per_layer = budget_bytes // max(num_layers, 1)
    slots = min(layout.num_experts, per_layer // layout.expert_bytes)
    if slots < 1:
        raise CacheConfigError(
            f"expert cache budget {budget_bytes / 2**30:.2f} GiB buys no slot for {num_layers} "
            f"layers: one expert needs {layout.expert_bytes / 2**20:.1f} MiB per layer; raise "
            "expert_cache_gib"
        )
    return slots


class LayerCache:
    """One MoE layer's slot pool on the device, its tables, and its copy paths."""

    def __init__(
        self,
        layer: int,
        store: HostExpertStore,
        num_slots: int,
        device: torch.device,
        cfg: CacheConfig,
        copy_stream: torch.cuda.Stream | None,
    ) -> None:
        L = store.layout
        self.layer, self.layout, self.cfg, self.device = layer, L, cfg, device
        self.num_slots = num_slots
        self.tables = SlotTables.allocate(L.num_experts, num_slots, device)
        self.weights = {
            n: torch.zeros(num_slots, *shape, dtype=L.section_dtype(n), device=device) for n, shape in L.shapes.items()
        }
        self.moe_kwargs = L.moe_kwargs(self.weights)  # the fused-MoE kernel's arguments besides w13 and w2
        self.src = list(store.section_bytes_of(layer).values())
        self.dst = [w.view(num_slots, -1).view(torch.uint8) for w in self.weights.values()]
        self.copy_stream = copy_stream
        self.pinned: set[int] = set()
        self.static = num_slots == L.num_experts  # everything resident: the table never changes
        self.max_pins = pin_budget(num_slots, L.num_experts, cfg.pin_fraction)
        self.bytes_ce = 0
        use = cfg.kernels_on(device)
        self._claim = claim_slots if use else claim_slots_reference
        self._copy = copy_experts if use else copy_experts_reference
        self._policy = POLICIES[cfg.policy]

    @property
    def w13(self) -> torch.Tensor:
        return self.weights["w13"]

    @property
    def w2(self) -> torch.Tensor:
        return self.weights["w2"]

    @property
    def w13_scale(self) -> torch.Tensor | None:
        return self.weights.get("w13_scale")

    @property
    def w2_scale(self) -> torch.Tensor | None:
        return self.weights.get("w2_scale")

    def rounds_for(self, distinct: int) -> int:
        """Rounds a step needing up to `distinct` experts takes: ceil(distinct / (slots - max_pins)). A round serves
        at least min(left, unpinned slots) of them, so this suffices whatever pins are set, and it never changes:
        a decode graph captures its rounds as a host loop, and one counted from the pins set at capture left the
        routes past its last round unserved once the placement manager pinned more (their rows then held whatever
        the graph pool's memory held; the suspected cause of the NaN logits of batched decode at GLM-5.1's depth)."""
        if self.static:
            return 1
        return max(1, math.ceil(distinct / (self.num_slots - self.max_pins)))

    # ------------------------------------------------------------------ host-decided bulk loads (copy engine)

    def _ce_copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (expert, slot) pairs by the copy engine on the side stream; the caller's stream waits."""
        if not pairs:
            return
        main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        stream = self.copy_stream if self.copy_stream is not None else main
        if stream is not None and stream is not main:
            stream.wait_stream(main)  # slots being overwritten may still be read by queued work
        ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with ctx:
            for e, s in pairs:
                for a, b in zip(self.src, self.dst):
                    b[s].copy_(a[e], non_blocking=True)
        if stream is not None and stream is not main:
            main.wait_stream(stream)
        self.bytes_ce += len(pairs) * self.layout.expert_bytes

    def load_initial(self, experts: list[int]) -> None:
        """Fill slots 0.. with `experts` (start-up or a warm restart); tables set to match."""
        if len(experts) > self.num_slots:
            raise CacheConfigError(f"layer {self.layer}: {len(experts)} initial experts for {self.num_slots} slots")
        pairs = list(zip(experts, range(len(experts))))
        self._ce_copy(pairs)
        t = self.tables
        for e, s in pairs:
            t.expert_to_slot[e] = s
            t.slot_to_expert[s] = e

    def check_pins(self, experts: set[int]) -> None:
        """Raise CacheConfigError unless `experts` can be this layer's pin set: ids in range, and no more than its pin
        budget (`max_pins`: a share of the slots, at least one slot left to serve misses) unless every expert is
        resident."""
        E = self.layout.num_experts
        bad = [e for e in experts if not 0 <= e < E]
        if bad:
            raise CacheConfigError(f"layer {self.layer}: cannot pin experts {bad[:8]}: ids are in [0, {E})")
        if len(experts) > self.max_pins and not self.static:
            raise CacheConfigError(
                f"layer {self.layer}: {len(experts)} pins exceed its pin budget of {self.max_pins} "
                f"({self.cfg.pin_fraction:g} of {self.num_slots} cache slots, one always left to serve misses; "
                "placement_pin_fraction sets the share)"
            )

    def set_pins(self, experts: set[int]) -> None:
        """Make exactly `experts` pinned (resident, never evicted); call between steps (it syncs)."""
        self.check_pins(experts)
        E = self.layout.num_experts
        t = self.tables
        e2s = t.expert_to_slot[:E].cpu()
        s2e = t.slot_to_expert.cpu()
        last = t.slot_last_use.cpu()
        pinned_slots = {int(e2s[e]) for e in experts if e2s[e] >= 0}
        free = sorted(
            (s for s in range(self.num_slots) if s not in pinned_slots), key=lambda s: (s2e[s] >= 0, int(last[s]), s)
        )
        pairs = []
        for e in sorted(experts):
            if e2s[e] < 0:
                s = free.pop(0)
                old = int(s2e[s])
                if old >= 0:
                    t.expert_to_slot[old] = -1
                t.expert_to_slot[e] = s
                t.slot_to_expert[s] = e
                pairs.append((e, s))
                pinned_slots.add(s)
        self._ce_copy(pairs)
        flags = torch.zeros(self.num_slots, dtype=torch.int8)
        flags[list(pinned_slots)] = 1
        t.slot_pinned.copy_(flags)
        self.pinned = set(experts)

    # ------------------------------------------------------------------ per-step miss service

    def serve_round(
        self,
        topk_ids: torch.Tensor,
        round_idx: int,
        round_ids: torch.Tensor,
        route_mask: torch.Tensor,
        exclude: torch.Tensor | None = None,
    ) -> None:
        """Claim slots for this round's experts, copy the missing ones in (kernels/expert_claim.py, expert_copy.py)."""
        self._claim(
            self.tables,
            topk_ids,
            round_idx,
            round_ids,
            route_mask,
            policy=self._policy,
            decay=self.cfg.lfu_decay,
            exclude=exclude,
        )
        if self.cfg.copy_path == "sm":
            if self._copy is copy_experts:
                copy_experts(self.tables, self.src, self.dst, num_programs=self.cfg.copy_programs)
            else:
                copy_experts_reference(self.tables, self.src, self.dst)
        else:
            n = int(self.tables.n_copy.item())  # the copy engine needs the list on the host: a sync
            e = self.tables.copy_expert[:n].tolist()
            s = self.tables.copy_slot[:n].tolist()
            self._ce_copy(list(zip(e, s)))

    def resident(self) -> dict[int, int]:
        """expert -> slot of every resident expert (reads the device table: a sync)."""
        e2s = self.tables.expert_to_slot[: self.layout.num_experts].cpu()
        return {e: int(s) for e, s in enumerate(e2s.tolist()) if s >= 0}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class ExpertCache:
    """Slot pools for a set of MoE layers, sized from one budget; its own state, never shared."""

    def __init__(
        self,
        store: HostExpertStore,
        device: torch.device | str,
        cfg: CacheConfig,
        slots: int | dict[int, int] | None = None,
        budget_bytes: int | None = None,
        initial: dict[int, list[int]] | None = None,
    ) -> None:
        self.store, self.cfg = store, cfg
        self.device = torch.device(device)
        L = store.layout
        if slots is None:
            if budget_bytes is None:
                raise CacheConfigError("ExpertCache needs slots= or budget_bytes=")
            slots = slots_for_budget(budget_bytes, L, len(store.layers))
        per_layer = slots if isinstance(slots, dict) else dict.fromkeys(store.layers, slots)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.layers: dict[int, LayerCache] = {}
        for layer in store.layers:
            S = per_layer.get(layer)
            if S is None or not 1 <= S <= L.num_experts:
                raise CacheConfigError(f"layer {layer}: {S} slots; need 1..{L.num_experts}")
            lc = LayerCache(layer, store, S, self.device, cfg, self.copy_stream)
            first = (initial or {}).get(layer, [])
            first = list(dict.fromkeys(first))[:S]
            rest = [e for e in range(L.num_experts) if e not in set(first)]
            lc.load_initial(first + rest[: S - len(first)])
            self.layers[layer] = lc
        total = sum(lc.num_slots for lc in self.layers.values()) * L.expert_bytes
        log.info(
            "expert cache on %s: %s slots per layer (%.2f GB), policy %s, copy path %s",
            self.device,
            sorted({lc.num_slots for lc in self.layers.values()}),
            total / 1e9,
            cfg.policy,
            cfg.copy_path,
        )

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]
