"""`RoutedExperts`: the engine's one entry to expert offload: where the model's routed experts live, how steps
compute them, their statistics and their pins.

Built from the engine's settings (`ExpertSettings`, which `EngineConfig` satisfies), it owns the MoE runner of
each role: the target's over the main MoE layers and, with MTP, the draft's over the MTP layers, each with its
own host store, GPU cache and budget, so neither's post-init or pins ever touch the other's state. With
`moe="torch"` both are `TorchMoERunner`s (every expert resident, nothing to pin). Here live once: the cache
budgets, the resolution of `miss_service`, and the pins queued since the last step (validated when queued,
applied by `apply_pins` between steps).

Budgets: `expert_cache_gb` as given; without it (CUDA only) they are sized when loading finishes, from the device
memory free once the non-expert weights are resident, less the KV pool the engine will allocate (`kv_bytes`, at most
half of that memory) and a reserve for activations and CUDA graphs (`activation_reserve_bytes`), shared by the
target and the draft in proportion to their layers (`auto_cache_budget`).

The rest of offload/, from here down: runner.py (one role's runner: rounds, GPU serving, stats),
host_store.py (the pinned slabs), expert_cache.py (slot pools, slot tables, pins, copies), hybrid.py (CPU experts
beside copies) with cpu_experts.py / cpu_experts.c (the CPU kernel and its server) and stream_signals.py (the
hand-over), torch_runner.py (every expert resident), stats.py, traces.py (synthetic routing for benchmarks).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from moed.model.config import ExpertDtype, GlmMoeDsaConfig
from moed.model.moe import ExpertWeights, MoERunner
from moed.offload.expert_cache import CacheConfig, CacheConfigError
from moed.offload.hybrid import HYBRID_MAX_TOKENS, CpuConfig
from moed.offload.runner import OffloadMoERunner
from moed.offload.stats import ExpertStats
from moed.offload.torch_runner import TorchMoERunner

log = logging.getLogger(__name__)


class ExpertSettings(Protocol):
    """The settings expert placement reads (fields of `engine.config.EngineConfig`)."""

    moe: str  # torch (every expert resident) | offload (host store + GPU expert cache per role)
    expert_cache_gb: float | None  # the target's cache budget in GiB; None: sized after loading (CUDA)
    draft_expert_cache_gb: float | None  # the draft's own; None: the target's per-layer share
    miss_service: str  # auto | copy | hybrid | cpu
    cpu_expert_threads: int  # 0: every core but one
    miss_column_split: bool  # hybrid: the boundary expert split by columns between the CPU and a copy
    spec_steps: int  # MTP draft tokens per step; > 0 builds the draft's runner
    max_running: int  # sequences decoded together at most: with spec_steps, the largest decode step
    expert_dtype: ExpertDtype  # checkpoint | int4: the format experts are held in (GlmMoeDsaConfig.expert_format)
    placement_pin_fraction: float  # share of each cache's slots that may be pinned (CacheConfig.pin_fraction)


class RoutedExperts:
    """The target's and the draft's MoE runners, their stats and their pins (module docstring)."""

    def __init__(
        self,
        cfg: GlmMoeDsaConfig,
        settings: ExpertSettings,
        device: torch.device,
        dtype: torch.dtype,
        kv_bytes: int = 0,
        activation_reserve_bytes: int | None = None,
    ) -> None:
        self.cfg = cfg
        spec = settings.spec_steps > 0
        self.target: MoERunner
        self.draft: MoERunner | None = None
        xd = settings.expert_dtype
        self.device = device
        self.kv_bytes = kv_bytes
        self.activation_reserve_bytes = (
            activation_reserve_bytes if activation_reserve_bytes is not None else default_activation_reserve(device)
        )
        self._auto_budget: tuple[str, ...] = ()  # roles whose budget is sized at finish_loading
        if settings.moe == "torch":
            self.target = TorchMoERunner(cfg, dtype, device, xd)
            self.draft = TorchMoERunner(cfg, dtype, device, xd) if spec else None
        else:
            main = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
            cpu = _cpu_config(settings, device)
            budget = _budget_bytes(settings.expert_cache_gb, "expert_cache_gb", device)
            cache = CacheConfig(pin_fraction=settings.placement_pin_fraction)
            self.target = OffloadMoERunner(
                cfg, main, device=device, expert_dtype=xd, budget_bytes=budget, name="target", cache=cache, cpu=cpu
            )
            if budget is None:
                self._auto_budget += ("target",)
            if spec:
                if settings.draft_expert_cache_gb is not None:
                    draft_budget = _budget_bytes(settings.draft_expert_cache_gb, "draft_expert_cache_gb", device)
                elif budget is not None:
                    draft_budget = budget // max(len(main), 1)  # the target's per-layer share
                else:
                    draft_budget = None  # sized with the target's when loading finishes
                self.draft = OffloadMoERunner(
                    cfg,
                    cfg.mtp_layer_ids,
                    device=device,
                    expert_dtype=xd,
                    budget_bytes=draft_budget,
                    name="draft",
                    cache=cache,
                    cpu=cpu,
                )
                if draft_budget is None:
                    self._auto_budget += ("draft",)
        self._draft_layers = set(cfg.mtp_layer_ids) if self.draft is not None else set()
        self._pending: dict[int, set[int]] = {}  # layer -> its whole pin set, queued since the last step

    # ------------------------------------------------------------------ loading (a MoERunner for load_model)

    def _owner(self, layer: int) -> MoERunner:
        return self.draft if self.draft is not None and layer in self._draft_layers else self.target

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        self._owner(layer).load_expert(layer, expert, weights)

    def finish_loading(self) -> None:
        """Each role's post-init, on its own layers only; budgets not given are sized now, the weights resident."""
        if self._auto_budget:
            self._size_budgets()
        self.target.finish_loading()
        if self.draft is not None:
            self.draft.finish_loading()

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self._owner(layer).run(layer, hidden, topk_ids, topk_weights)

    def _size_budgets(self) -> None:
        runners = {"target": self.target, "draft": self.draft}
        torch.cuda.empty_cache()  # blocks the loader's temporaries left in torch's cache count as free
        free = torch.cuda.mem_get_info(self.device)[0]
        given = sum(r.budget_bytes or 0 for r in self.offloaded)  # a role whose budget was given
        layers = {name: len(runners[name].layers) for name in self._auto_budget}  # type: ignore[union-attr]
        budgets = plan_budgets(free, self.kv_bytes, self.activation_reserve_bytes + given, layers)
        for name, b in budgets.items():
            runners[name].budget_bytes = b  # type: ignore[union-attr]
        log.info(
            "expert cache budget sized after loading: %.2f GiB free on %s - KV %.2f GiB - reserve %.2f GiB%s -> %s",
            free / 2**30,
            self.device,
            min(self.kv_bytes, free // 2) / 2**30,
            self.activation_reserve_bytes / 2**30,
            f" - given budgets {given / 2**30:.2f} GiB" if given else "",
            ", ".join(f"{name} {b / 2**30:.2f} GiB" for name, b in budgets.items()),
        )

    # ------------------------------------------------------------------ what the engine reads

    @property
    def offloaded(self) -> list[OffloadMoERunner]:
        """The runners with an expert cache, target first."""
        return [r for r in (self.target, self.draft) if isinstance(r, OffloadMoERunner)]

    @property
    def miss_service(self) -> str:
        """The target's miss service as it runs (copy, hybrid, cpu); "" when every expert is resident."""
        runners = self.offloaded
        return runners[0].miss_service if runners else ""

    @property
    def cpu_serves_misses(self) -> bool:
        """Whether any role computes misses on the CPU (its results then differ from the GPU's by rounding)."""
        return any(r.miss_service != "copy" for r in self.offloaded)

    def stats(self) -> ExpertStats:
        """Per-layer counters (cumulative) and activations since the last call (syncs: off the step path)."""
        out = ExpertStats(layers=[], counts={}, miss_service=self.miss_service, rates_Bps={})
        for r in self.offloaded:
            out.layers += r.stats()
            out.counts.update(r.read_counts())
        target = self.target
        if isinstance(target, OffloadMoERunner) and target.hybrid is not None:
            # the rates the split uses; the CPU's follows its load
            out.rates_Bps = {"cpu": target.hybrid.cpu_rate, "copy": target.hybrid.copy_rate}
        return out

    def close(self) -> None:
        for r in self.offloaded:
            r.close()

    # ------------------------------------------------------------------ pins

    def _caches(self) -> dict[int, OffloadMoERunner]:
        return {layer: r for r in self.offloaded for layer in r.layers}

    def pinned(self) -> dict[str, list[int]]:
        """Per cached layer: its pins, as queued when a change waits for the next step."""
        return {
            str(layer): sorted(self._pending.get(layer, r.cache[layer].pinned))  # type: ignore[index]
            for layer, r in self._caches().items()
        }

    @property
    def pins_pending(self) -> bool:
        return bool(self._pending)

    def cache_slots(self) -> dict[str, int]:
        """Per cached layer: its slots (a layer whose slots equal its experts holds them all)."""
        return {str(layer): r.cache[layer].num_slots for layer, r in self._caches().items()}  # type: ignore[index]

    def placement(
        self, op: str, layer: int | None, expert: int | None, pins: dict[str, list[int]] | None = None
    ) -> tuple[bool, str, dict[str, list[int]]]:
        """Pin / unpin / reset / get, or set (`pins`: layer -> its whole pin set, every layer checked before any is
        queued); changes are queued and applied before the next step.
        Returns (ok, message, pins per cached layer after the change)."""
        owner = self._caches()
        if not owner:
            return (
                False,
                (
                    f"expert placement is not available: the MoE runner {type(self.target).__name__} "
                    "keeps every expert resident (no expert cache to pin into; run with moe=offload)"
                ),
                {},
            )
        if op == "get":
            return True, "", self.pinned()
        if layer is not None and layer not in owner:
            return False, f"layer {layer} has no expert cache (cached MoE layers: {sorted(owner)})", self.pinned()
        if op == "set":
            if not pins:
                return False, "placement set needs pins: layer -> the experts to pin there", self.pinned()
            plans = {}
            for key, experts in pins.items():
                lay = int(key) if key.lstrip("-").isdigit() else None
                if lay not in owner:
                    return False, f"layer {key} has no expert cache (cached MoE layers: {sorted(owner)})", self.pinned()
                try:  # ids in range, one slot left to serve misses
                    owner[lay].cache[lay].check_pins(set(experts))  # type: ignore[index]
                except CacheConfigError as e:
                    return False, str(e), self.pinned()
                plans[lay] = set(experts)
        elif op == "reset":
            plans = {lay: set() for lay in ([layer] if layer is not None else sorted(owner))}
        elif op in ("pin", "unpin"):
            if layer is None or expert is None:
                return False, f"placement {op} needs a layer and an expert", self.pinned()
            E = self.cfg.n_routed_experts
            if not 0 <= expert < E:
                return False, f"expert {expert} is out of range [0, {E})", self.pinned()
            lc = owner[layer].cache[layer]  # type: ignore[index]
            plan = set(self._pending.get(layer, lc.pinned))
            plan = plan | {expert} if op == "pin" else plan - {expert}
            try:
                lc.check_pins(plan)
            except CacheConfigError as e:
                return False, str(e), self.pinned()
            plans = {layer: plan}
        else:
            return False, f"unknown placement op {op!r} (get, pin, unpin, reset, set)", self.pinned()
        self._pending.update(plans)
        return True, "queued; applied before the next step", self.pinned()

    def apply_pins(self) -> None:
        """Apply the pins queued since the last step; call between steps (it syncs)."""
        pending, self._pending = self._pending, {}
        owner = self._caches()
        for layer, pins in pending.items():
            try:
                owner[layer].cache[layer].set_pins(pins)  # type: ignore[index]
            except CacheConfigError:  # validated when queued; a cache that changed since only loses the plan
                log.exception("applying the pins of MoE layer %d failed; its plan is dropped", layer)


ACTIVATION_RESERVE_FRACTION = 0.05  # of the device's memory: 4 GB of an 80 GB H100 (prefill activations, graph pools)


def default_activation_reserve(device: torch.device) -> int:
    """Device memory an automatic cache budget leaves for activations and CUDA graphs (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    return max(1 << 30, int(ACTIVATION_RESERVE_FRACTION * torch.cuda.get_device_properties(device).total_memory))


def auto_cache_budget(free_bytes: int, kv_bytes: int, reserve_bytes: int) -> int:
    """The expert caches' budget when none is given: the device memory free after the weights (`free_bytes`), less
    the KV pool the engine will allocate (`kv_bytes`, at most half of that memory: a pool sized for max_running
    sequences of max_model_len could otherwise leave the cache nothing) and `reserve_bytes`."""
    kv = min(kv_bytes, free_bytes // 2)
    budget = free_bytes - kv - reserve_bytes
    if budget <= 0:
        raise ValueError(
            f"no device memory left for the expert cache: {free_bytes / 2**30:.2f} GiB free after the "
            f"weights, KV {kv / 2**30:.2f} GiB, reserve {reserve_bytes / 2**30:.2f} GiB (set "
            "expert_cache_gb, or lower kv_pages / max_running / max_model_len)"
        )
    return budget


def plan_budgets(free_bytes: int, kv_bytes: int, reserve_bytes: int, layers: dict[str, int]) -> dict[str, int]:
    """`auto_cache_budget` shared by the roles named in `layers` (role -> its MoE layers) in proportion to their
    layers, so each gets the same slots per layer."""
    total = auto_cache_budget(free_bytes, kv_bytes, reserve_bytes)
    n = sum(layers.values())
    return {name: total * count // n for name, count in layers.items()}


def _budget_bytes(gib: float | None, name: str, device: torch.device) -> int | None:
    """A cache budget of `gib` GiB, or None: sized when loading finishes (CUDA only)."""
    if gib is not None:
        if gib <= 0:
            raise ValueError(f"{name} = {gib} must be > 0 GiB")
        return int(gib * 2**30)
    if device.type != "cuda":
        raise ValueError(f"{name} must be given off CUDA (there is no device memory to size it from)")
    return None


def hybrid_max_tokens(max_running: int, spec_steps: int) -> int:
    """The largest step whose misses the CPU shares: every decode step (max_running sequences, 1 + spec_steps tokens
    each) up to HYBRID_MAX_TOKENS. A batched decode step routes a few tokens to each of many experts, which the CPU
    reads once like a batch-1 step's; left to copies alone it runs at the copy engine's ~51 GB/s instead of the
    ~120 GB/s both reach together (H100, docs/benchmarks.md). Larger steps are prefill chunks: they copy."""
    return min(HYBRID_MAX_TOKENS, max(8, max_running * (1 + spec_steps)))


def _cpu_config(settings: ExpertSettings, device: torch.device) -> CpuConfig | None:
    """The CPU's part in serving decode misses, or None when every miss is copied.

    auto: hybrid on CUDA, copy on a CPU device (where "copies" are host memcpys: nothing for CPU experts to beat),
    falling back to copies where the CPU kernel cannot be built (an explicit hybrid or cpu fails instead).
    hybrid: decode steps split their misses between the CPU and copies; cpu: every decode miss on the CPU. Both
    run in CUDA graphs too (the hand-over is stream memory operations); prefill steps always copy."""
    ms = settings.miss_service
    if ms == "auto":
        ms = "hybrid" if device.type == "cuda" else "copy"
    if ms == "copy":
        return None
    return CpuConfig(
        policy=ms,
        max_tokens=hybrid_max_tokens(settings.max_running, settings.spec_steps),
        threads=settings.cpu_expert_threads,
        fallback_to_copy=settings.miss_service == "auto",
        column_split=settings.miss_column_split,
    )
