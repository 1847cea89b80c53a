"""The expert caches' budget when none is given: sized after the weights load, after the KV pool and a reserve."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moed.model.config import GlmMoeDsaConfig
from moed.offload.routed_experts import RoutedExperts, auto_cache_budget, plan_budgets

GiB = 2**30


def test_auto_budget_leaves_the_kv_pool_and_the_reserve():
    # GLM-5.1 on an 80 GB H100: ~41 GiB free once ~38 GiB of non-expert weights are resident; KV for 4 x 32k tokens
    # at ~100 kB/token (12.2 GiB) and a 4 GiB reserve leave ~24.8 GiB for the expert cache.
    kv = 4 * 32768 * 100_000
    assert auto_cache_budget(41 * GiB, kv, 4 * GiB) == 41 * GiB - kv - 4 * GiB


def test_auto_budget_caps_the_kv_pool_at_half_of_what_is_free():
    # 64 sequences of GLM-5.1's 202,752 positions would want ~1.3 TB of KV: the pool gets half, the cache the rest.
    assert auto_cache_budget(40 * GiB, 1300 * 10**9, 4 * GiB) == 16 * GiB


def test_auto_budget_names_the_numbers_when_nothing_is_left():
    with pytest.raises(ValueError, match=r"no device memory left for the expert cache: 3\.00 GiB free .* KV 1\.50 GiB"):
        auto_cache_budget(3 * GiB, 10 * GiB, 2 * GiB)


def test_roles_share_the_budget_by_layers():
    budgets = plan_budgets(41 * GiB, 0, 1 * GiB, {"target": 75, "draft": 1})
    assert budgets["target"] == 40 * GiB * 75 // 76 and budgets["draft"] == 40 * GiB // 76
    assert budgets["target"] // 75 == budgets["draft"]  # the same per-layer share
    assert plan_budgets(10 * GiB, 2 * GiB, 1 * GiB, {"target": 3}) == {"target": 7 * GiB}


@dataclasses.dataclass
class _Settings:  # the fields of EngineConfig that RoutedExperts reads
    expert_cache_gb: float | None
    draft_expert_cache_gb: float | None = None
    moe: str = "offload"
    miss_service: str = "copy"
    cpu_expert_threads: int = 0
    miss_column_split: bool = False
    spec_steps: int = 1
    max_running: int = 4
    expert_dtype: str = "checkpoint"
    placement_pin_fraction: float = 0.5


def test_given_budgets_off_cuda_and_the_drafts_share(tiny_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(tiny_checkpoint)
    main = cfg.num_hidden_layers - cfg.first_k_dense_replace
    experts = RoutedExperts(cfg, _Settings(expert_cache_gb=0.25), torch.device("cpu"), torch.float32)
    assert experts.target.budget_bytes == GiB // 4
    assert experts.draft.budget_bytes == GiB // 4 // main  # no draft budget: the target's per-layer share
    with pytest.raises(ValueError, match="expert_cache_gb must be given off CUDA"):
        RoutedExperts(cfg, _Settings(expert_cache_gb=None), torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_offload_without_a_budget_sizes_the_cache_after_the_weights(tiny_checkpoint, caplog):
    """moe=offload without expert_cache_gb: the cache is sized when loading ends (from what the weights left), the
    KV pool still fits, and the engine serves."""
    from moed.engine.config import EngineConfig
    from moed.engine.llm_engine import LLMEngine
    from moed.engine.protocol import SamplingParams

    caplog.set_level("INFO", logger="moed.offload.routed_experts")
    e = LLMEngine(
        EngineConfig(
            model=tiny_checkpoint,
            device="cuda",
            dtype="bf16",
            moe="offload",
            max_running=2,
            max_model_len=256,
            cuda_graphs=False,
        )
    )
    assert "expert cache budget sized after loading" in caplog.text
    target = e.experts.target
    assert target.budget_bytes is not None and target.cache is not None
    free = torch.cuda.mem_get_info()[0]
    assert free >= e.experts.activation_reserve_bytes * 0.5  # the reserve was left free
    out = e.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0]) == 4


def test_miss_column_split_setting_reaches_the_cpu_config():
    """EngineConfig.miss_column_split (off by default) is the CPU config's column_split; copy has no CPU config."""
    from moed.engine.config import EngineConfig
    from moed.offload.routed_experts import _cpu_config

    assert EngineConfig.__dataclass_fields__["miss_column_split"].default is False
    for on in (False, True):
        settings = _Settings(expert_cache_gb=1, miss_service="hybrid", miss_column_split=on)
        cpu = _cpu_config(settings, torch.device("cpu"))
        assert cpu is not None and cpu.column_split is on
    assert _cpu_config(_Settings(expert_cache_gb=1, miss_column_split=True), torch.device("cpu")) is None


def test_every_decode_step_shares_its_misses_with_the_cpu():
    """The hybrid service takes every decode step (max_running x (1 + spec_steps) tokens, at least 8), capped where
    its tables stop growing; larger steps (prefill chunks) copy."""
    from moed.offload.hybrid import HYBRID_MAX_TOKENS
    from moed.offload.routed_experts import _cpu_config

    def max_tokens(max_running: int, spec_steps: int) -> int:
        s = _Settings(expert_cache_gb=1, miss_service="hybrid", max_running=max_running, spec_steps=spec_steps)
        cpu = _cpu_config(s, torch.device("cpu"))
        assert cpu is not None
        return cpu.max_tokens

    assert max_tokens(1, 0) == 8 and max_tokens(64, 0) == 64 and max_tokens(32, 1) == 64
    assert max_tokens(64, 3) == HYBRID_MAX_TOKENS == 256
