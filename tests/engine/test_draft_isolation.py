"""Draft (MTP) worker isolation: own store, cache, budget; the target's post-init never runs for it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import load_model
from moed.offload.expert_cache import slots_for_budget
from moed.offload.routed_experts import RoutedExperts
from moed.offload.runner import OffloadMoERunner


@dataclasses.dataclass
class _Settings:  # the fields of EngineConfig that RoutedExperts reads
    expert_cache_gb: float
    draft_expert_cache_gb: float
    moe: str = "offload"
    miss_service: str = "copy"
    cpu_expert_threads: int = 0
    miss_column_split: bool = False
    spec_steps: int = 1
    expert_dtype: str = "checkpoint"
    placement_pin_fraction: float = 0.5


def test_draft_runner_has_isolated_state_budget_and_never_touches_target_pins(tiny_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(tiny_checkpoint)
    main_layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    assert cfg.mtp_layer_ids, "the tiny checkpoint has an MTP layer"
    probe = OffloadMoERunner(cfg, layers=cfg.mtp_layer_ids, device="cpu", slots=1, name="probe")
    eb = probe.layout.expert_bytes
    draft_budget = 3 * eb  # the draft's own budget: 3 slots for its one layer
    experts = RoutedExperts(
        cfg,
        _Settings(expert_cache_gb=6 * len(main_layers) * eb / 2**30, draft_expert_cache_gb=draft_budget / 2**30),
        torch.device("cpu"),
        torch.float32,
    )
    target, draft = experts.target, experts.draft
    finishes = {"target": 0, "draft": 0}
    for r in (target, draft):
        real = r.finish_loading

        def counted(real=real, name=r.name):
            finishes[name] += 1
            real()

        r.finish_loading = counted
    load_model(tiny_checkpoint, experts, mtp=True)
    assert finishes == {"target": 1, "draft": 1}  # each post-init ran once, for its own layers only
    assert set(target.cache.layers) == set(main_layers) and set(draft.cache.layers) == set(cfg.mtp_layer_ids)
    assert target.cache[1].num_slots == 6
    assert draft.cache[cfg.mtp_layer_ids[0]].num_slots == slots_for_budget(draft_budget, draft.layout, 1) == 3
    assert target.store is not draft.store and target.cache is not draft.cache
    ptrs = lambda r: {t.data_ptr() for lc in r.cache.layers.values() for t in vars(lc.tables).values()}  # noqa: E731
    assert not ptrs(target) & ptrs(draft), "no slot table is shared"

    assert experts.placement("pin", 1, 0)[0] and experts.placement("pin", 1, 2)[0]  # the target's layer only
    experts.apply_pins()
    before = {layer: lc.tables.clone() for layer, lc in target.cache.layers.items()}
    g = torch.Generator().manual_seed(0)
    mtp = cfg.mtp_layer_ids[0]
    for _ in range(6):  # the draft misses a lot with 3 slots
        ids = torch.stack(
            [torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok] for _ in range(2)]
        ).to(torch.int32)
        draft.run(mtp, torch.randn(2, cfg.hidden_size, generator=g), ids, torch.rand(2, ids.shape[1], generator=g))
    assert draft.stats()[0].evictions > 0
    for layer, lc in target.cache.layers.items():
        for name, t in vars(lc.tables).items():
            assert torch.equal(t, getattr(before[layer], name)), (layer, name)
    assert {0, 2} <= set(target.cache[1].resident()) and draft.cache[mtp].pinned == set()
    with pytest.raises(KeyError, match="does not serve MoE layer"):
        draft.run(1, torch.zeros(1, cfg.hidden_size), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))
