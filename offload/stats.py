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
    bytes_copied_sm: int  # by the UVA copy kernel (misses and SM prefetches)
    bytes_copied_ce: int  # by the copy engine (bulk loads, pins, CE prefetches, CE-path misses)
    bytes_cpu: int  # expert bytes the CPU kernel read instead of copying
    evictions: int
    stall_s: float  # host time the step spent waiting for the miss service (hybrid split and CPU join)
    cpu_experts: int
    prefetch_tp: int  # predicted experts that the step then used
    prefetch_predicted: int
    prefetch_actual: int  # experts used in steps that had a prediction
    steps: int

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    @property
    def prefetch_precision(self) -> float | None:
        return self.prefetch_tp / self.prefetch_predicted if self.prefetch_predicted else None

    @property
    def prefetch_recall(self) -> float | None:
        return self.prefetch_tp / self.prefetch_actual if self.prefetch_actual else None

    def as_protocol_fields(self) -> dict:
        return {
            "layer": self.layer, "hits": self.hits, "misses": self.misses,
            "bytes_copied": self.bytes_copied_sm + self.bytes_copied_ce, "bytes_cpu": self.bytes_cpu,
            "evictions": self.evictions, "stall_s": self.stall_s, "cpu_experts": self.cpu_experts,
            "prefetch_precision": self.prefetch_precision, "prefetch_recall": self.prefetch_recall,
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
    tot = {f.name: sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(OffloadLayerStats)
           if f.name != "layer"}
    n = tot["hits"] + tot["misses"]
    tot["hit_rate"] = tot["hits"] / n if n else None
    tot["prefetch_precision"] = tot["prefetch_tp"] / tot["prefetch_predicted"] if tot["prefetch_predicted"] else None
    tot["prefetch_recall"] = tot["prefetch_tp"] / tot["prefetch_actual"] if tot["prefetch_actual"] else None
    return tot
