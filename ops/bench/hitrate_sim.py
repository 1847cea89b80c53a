"""The hit-rate benchmark's simulation: eviction and placement policies, decode step shapes and routing traces,
served step by step through one MoE layer's own `LayerCache`, with the hybrid miss split and the daemon's pin
planner where the engine would run them. Nothing here re-implements the cache."""

from __future__ import annotations

import dataclasses
import time
import types
from pathlib import Path

import numpy as np
import torch

from moed.daemon.config import ServeConfig
from moed.daemon.pin_planner import PinPlanner
from moed.kernels.expert_claim import STATS
from moed.kernels.miss_split import split_misses_reference
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig
from moed.offload.expert_cache import CacheConfig, ExpertCache, LayerCache
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.hybrid import HybridMissService
from moed.offload.pins import pin_budget
from moed.offload.routed_experts import _cpu_config
from moed.offload.traces import skewed_trace, uniform_trace, verify_steps

MOE_LAYERS = 75
E, K_TOP = 256, 8
LAYER = 3  # the simulated layer's id (any MoE layer: every layer's cache runs alone)


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    eviction: str = "lru"  # CacheConfig.policy: the claim kernel's victim key
    lfu_decay: float = 0.95
    pin_fraction: float = 0.0  # share of the slots the placement manager pins with its hottest experts
    oracle: bool = False  # next uses known: victims and CPU misses are the ones needed last


def shipped_policy() -> Policy:
    """What moed runs by default: the daemon's placement manager pinning `placement_pin_fraction` of each layer's
    slots (daemon/config.py) and the cache's default eviction among the rest (offload/expert_cache.py)."""
    fraction = next(f.default for f in dataclasses.fields(ServeConfig) if f.name == "placement_pin_fraction")
    cache = CacheConfig()
    name = f"pinned-{round(100 * fraction)}%+{cache.policy}" if fraction else cache.policy
    return Policy(name, cache.policy, lfu_decay=cache.lfu_decay, pin_fraction=fraction)


POLICIES = (
    Policy("lru"),
    Policy("lfu", "lfu"),
    Policy("lfu-0.99", "lfu", lfu_decay=0.99),
    Policy("pinned-50%+lru", pin_fraction=0.5),
    Policy("pinned-75%+lru", pin_fraction=0.75),
    Policy("pinned-75%+lfu", "lfu", pin_fraction=0.75),
    Policy("oracle", "lfu", lfu_decay=1.0, oracle=True),
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decode step: `batch` sequences, each with 1 + spec_steps tokens (MTP verify)."""

    batch: int
    spec_steps: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * (1 + self.spec_steps)

    @property
    def name(self) -> str:
        return f"b{self.batch}" + (f"+mtp{self.spec_steps}" if self.spec_steps else "")


SHAPES = (Shape(1), Shape(8), Shape(32), Shape(1, 1), Shape(8, 1), Shape(32, 1))


def make_trace(name: str, shape: Shape, steps: int, seed: int) -> np.ndarray:
    """[steps, shape.tokens, k]: `steps` verify steps of every chain of `shape.batch` chains. "skewed" is
    offload/traces.py's calibrated generator, "popular" its popularity law alone (no reuse beyond what popularity
    gives, the regime where published LRU results collapse), "uniform" no preference at all."""
    n = 1 + shape.spec_steps
    chain_tokens = steps * n
    if name == "uniform":
        t = uniform_trace(chain_tokens, shape.batch, E, K_TOP, seed=seed)
    elif name == "skewed":
        t = skewed_trace(chain_tokens, shape.batch, E, K_TOP, seed=seed, ranking_seed=LAYER)
    elif name == "popular":
        t = skewed_trace(chain_tokens, shape.batch, E, K_TOP, seed=seed, ranking_seed=LAYER, p_prev=0.0, p_recent=0.0)
    else:
        raise ValueError(f"trace {name!r}: uniform, skewed or popular")
    return verify_steps(t, n)


def _layer_cache(slots: int, policy: Policy) -> LayerCache:
    cfg = GlmMoeDsaConfig.from_dict(make_config("tiny", experts=E), source="hit-rate bench layer")
    layout = ExpertLayout.for_config(cfg)
    store = HostExpertStore(layout, [LAYER], pin=False)  # bytes never read: copies only move garbage here
    cache = ExpertCache(
        store,
        "cpu",
        CacheConfig(
            policy=policy.eviction, lfu_decay=policy.lfu_decay, use_kernels=False, pin_fraction=policy.pin_fraction
        ),
        slots=slots,
    )
    return cache[LAYER]


def split_table(shape: Shape, cpu_rate: float, copy_rate: float) -> tuple[torch.Tensor, range]:
    """The hybrid service's table counts[M, n_miss] (CPU experts per step of M tokens with n_miss misses) as
    `HybridMissService` builds it from the two rates, and the step sizes the engine splits (routed_experts.py) when
    it runs `shape.batch` sequences at most."""
    settings = types.SimpleNamespace(
        miss_service="hybrid",
        spec_steps=shape.spec_steps,
        max_running=shape.batch,
        cpu_expert_threads=0,
        miss_column_split=False,
    )
    cpu = _cpu_config(settings, torch.device("cuda"))
    assert cpu is not None
    service = types.SimpleNamespace(cfg=cpu, copy_rate=copy_rate)
    table = np.stack(
        [
            HybridMissService._cpu_counts(service, cpu_rate, cpu.max_tokens * K_TOP)  # type: ignore
            for _ in range(cpu.max_tokens + 1)
        ]
    )
    return torch.from_numpy(table).to(torch.int32), range(cpu.min_tokens, cpu.max_tokens + 1)


def _next_use(steps: np.ndarray) -> np.ndarray:
    """[T, E] float: the step at which each expert is next needed after step t (inf: never)."""
    T = steps.shape[0]
    used = np.zeros((T, E), dtype=bool)
    for t in range(T):
        used[t, np.unique(steps[t])] = True
    nxt = np.full((T, E), np.inf)
    upcoming = np.full(E, np.inf)
    for t in range(T - 1, -1, -1):
        nxt[t] = upcoming
        upcoming = np.where(used[t], t, upcoming)
    return nxt


def simulate(
    steps: np.ndarray,
    slots: int,
    policy: Policy,
    shape: Shape,
    warm_steps: int,
    cpu_rate: float,
    copy_rate: float,
    pin_interval_tokens: int,
    state_path: Path | None = None,
    split: bool = True,
) -> dict:
    """Serve `steps` ([T, M, k] int32) through one layer's cache; counters over the steps after `warm_steps`.
    A pinned policy's planner starts from `state_path` when that file exists (a restart) and writes it at the end.
    `split=False` copies every miss (miss_service copy) where the engine would split.

    Every step goes through `LayerCache.serve_round` (the claim kernel's torch reference) in the engine's rounds;
    steps the engine gives the hybrid miss service first run its split's reference with the service's table
    (`split_table`), and the CPU's misses never enter the cache. Pinned policies run the daemon's `PinPlanner` on
    the cache's own activation counts every `pin_interval_tokens` and apply its plan with `LayerCache.set_pins`,
    as the engine does between steps. The oracle's victims (and CPU share) are the experts needed last."""
    lc = _layer_cache(slots, policy)
    T, M, k = steps.shape
    table, split_sizes = split_table(shape, cpu_rate, copy_rate)
    hybrid = split and M in split_sizes
    header = torch.zeros(7, dtype=torch.int32)
    mailbox = dict(
        cpu_experts=torch.zeros(M * k, dtype=torch.int32),
        ids_out=torch.zeros(M * k, dtype=torch.int32),
        w_out=torch.zeros(M * k),
        x_out=torch.zeros(M, 1),
        exclude=torch.zeros(E, dtype=torch.int8),
        gpu_weights=torch.zeros(M * k),
    )
    weights, hidden = torch.ones(M, k), torch.zeros(M, 1)
    planner = None
    if policy.pin_fraction > 0:

        def read_counts() -> dict[int, list[int]]:
            row = lc.tables.expert_count.tolist()
            lc.tables.expert_count.zero_()
            return {LAYER: row}

        planner = PinPlanner(
            E,
            [LAYER],
            pin_budget(slots, E, policy.pin_fraction),
            read_counts=read_counts,
            apply=lambda pins: lc.set_pins(pins[LAYER]),
            state_path=state_path,
        )
        planner.replan()  # the daemon's warm start: pins from the state file before the first step
        pin_every = max(1, round(pin_interval_tokens / shape.tokens))
    nxt = _next_use(steps) if policy.oracle else None
    round_ids, mask = torch.empty(M, k, dtype=torch.int32), torch.empty(M, k, dtype=torch.int8)
    cpu = distinct = 0
    miss_hist = np.zeros(M * k + 1, dtype=np.int64)  # measured split steps by their misses (the split's n_miss)
    base = None
    t0 = time.perf_counter()
    for t in range(T):
        if t == warm_steps:
            base, cpu, distinct = lc.tables.stats.clone(), 0, 0
            miss_hist[:] = 0
        if planner is not None and t and t % pin_every == 0:
            planner.tick()
        ids = torch.from_numpy(steps[t])
        if nxt is not None:  # victims, the miss order and the split read expert_freq: the nearness of the next use,
            # scaled so that the step's route counts (added by round 0) cannot reorder it
            lc.tables.expert_freq.copy_(torch.from_numpy(1e9 / (nxt[t] - t)).float())
        exclude = None
        if hybrid:
            split_misses_reference(
                ids,
                weights,
                hidden,
                lc.tables.expert_to_slot,
                lc.tables.expert_freq,
                table[M],
                header=header,
                layer_index=0,
                **mailbox,
            )
            exclude = mailbox["exclude"]
            cpu += int(header[1])
            miss_hist[int(header[2])] += 1
        for r in range(lc.rounds_for(min(E, M * k))):  # pins change the unpinned slots, so the rounds
            lc.serve_round(ids, r, round_ids, mask, exclude=exclude)
        distinct += len(np.unique(steps[t]))
    assert base is not None
    if planner is not None and state_path is not None:
        planner.update(planner.read_counts())
        planner.save(state_path)
    d = dict(zip(STATS, (lc.tables.stats - base).tolist()))
    d["copied"], n = d["misses"], T - warm_steps
    if d["hits"] + d["copied"] + cpu != distinct or d["steps"] != n:
        raise AssertionError(f"{policy.name} {shape.name}: hits + copies + CPU != distinct experts")
    return {
        "hit_rate": d["hits"] / distinct,
        "distinct": distinct / n,
        "hits": d["hits"] / n,
        "copied": d["copied"] / n,
        "cpu": cpu / n,
        "hybrid": hybrid,
        "steps": n,
        "pins": len(lc.pinned),
        "miss_hist": np.trim_zeros(miss_hist, "b").tolist() if hybrid else [],
        "wall_s": time.perf_counter() - t0,
    }
