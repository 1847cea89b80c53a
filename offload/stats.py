"""Offload statistics: per layer in the fields of `engine.protocol.LayerExpertStats`, and per engine.

offload/ sits below engine/ in the dependency order, so this module defines its own dataclasses;
`as_protocol_fields()` gives exactly the keyword arguments LayerExpertStats takes.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class OffloadLayerStats:
    layer: int
    hits: int  # distinct experts found resident when a step needed them
    misses: int  # distinct experts not resident (copied or computed on the CPU)
    bytes_copied_sm: int  # by the UVA copy kernel (misses)
    bytes_copied_ce: int  # by the copy engine (bulk loads, pins, CE-path misses)
    bytes_cpu: int  # expert bytes the CPU kernel read instead of copying
    evictions: int
    stall_s: float  # host time the step spent waiting for the miss service (hybrid split and CPU join)
    cpu_experts: int
    steps: int

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    def as_protocol_fields(self) -> dict:
        return {
            "layer": self.layer,
            "hits": self.hits,
            "misses": self.misses,
            "bytes_copied": self.bytes_copied_sm + self.bytes_copied_ce,
            "bytes_cpu": self.bytes_cpu,
            "evictions": self.evictions,
            "stall_s": self.stall_s,
            "cpu_experts": self.cpu_experts,
        }


@dataclasses.dataclass
class ExpertStats:
    """What `RoutedExperts.stats()` reports: every cached layer's counters, target's then draft's."""

    layers: list[OffloadLayerStats]
    counts: dict[int, list[int]]  # layer -> activations per expert since the last read
    miss_service: str  # copy | hybrid | cpu as the target runs it; "" with every expert resident
    rates_Bps: dict[str, float]  # {"cpu", "copy"}: the rates the hybrid split uses; empty without CPU experts


def summarize(stats: list[OffloadLayerStats]) -> dict:
    """Totals over layers (for logs and the benchmark)."""
    tot = {
        f.name: sum(getattr(s, f.name) for s in stats)
        for f in dataclasses.fields(OffloadLayerStats)
        if f.name != "layer"
    }
    n = tot["hits"] + tot["misses"]
    tot["hit_rate"] = tot["hits"] / n if n else None
    return tot
