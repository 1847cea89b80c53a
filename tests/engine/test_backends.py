"""The engine over the kernel backends: the paged Triton attention (interpreted on CPU) and the offload
MoE runner (host store + expert cache smaller than the experts), each against the reference engine."""

from __future__ import annotations

import pytest
import torch

from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams

SP = SamplingParams(max_tokens=4, ignore_eos=True)
BASE = {"max_running": 4, "max_tokens_per_step": 16, "page_size": 4}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (6, 20)]  # 20 > index_topk: sparse


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> list[list[int]]:
    e = LLMEngine(EngineConfig(model=tiny_checkpoint, **BASE))
    return [e.generate([p], SP)[0] for p in _prompts()]


def test_engine_paged_triton_backend_matches_reference(tiny_checkpoint, reference):
    # Target and MTP draft each get their own paged pool, both indexed by the engine's page lists.
    e = LLMEngine(EngineConfig(model=tiny_checkpoint, attention="triton", spec_steps=2, **BASE))
    assert e.runner.paged and e.drafter is not None and e.drafter.backend.pool is not e.runner.backend.pool
    assert e.runner.backend.pool.layers == list(range(e.cfg.num_hidden_layers))
    assert e.drafter.backend.pool.layers == e.cfg.mtp_layer_ids
    assert e.generate(_prompts(), SP) == reference
    assert e.kv.num_free == e.kv.num_pages and e.kv.first_page == 1  # page 0 stays the pools' scratch page


def test_engine_offload_runner_matches_reference_and_takes_placement(tiny_checkpoint, reference):
    per_layer = 8 * 49152  # 8 of the tiny model's 16 experts (bf16 gate, up, down of 64 x 128)
    e = LLMEngine(
        EngineConfig(
            model=tiny_checkpoint,
            moe="offload",
            expert_cache_gb=3 * per_layer / 2**30,
            spec_steps=1,
            draft_expert_cache_gb=per_layer / 2**30,
            **BASE,
        )
    )
    target, draft = e.runner.moe, e.drafter.moe
    assert sorted(target.cache.layers) == [1, 2, 3] and sorted(draft.cache.layers) == e.cfg.mtp_layer_ids
    assert e.generate(_prompts(), SP) == reference
    stats = e.stats()
    by_layer = {s.layer: s for s in stats.experts}
    assert set(by_layer) == {1, 2, 3, 4} and sum(s.misses for s in stats.experts) > 0
    assert set(stats.expert_counts) == {"1", "2", "3", "4"} and sum(stats.expert_counts["1"]) > 0

    ok, _, pinned = e.placement("pin", 2, 5)
    assert ok and pinned["2"] == [5] and 5 not in target.cache[2].pinned  # queued until the next step
    e.generate([_prompts()[0]], SP)
    assert target.cache[2].pinned == {5}
    assert e.placement("get", None, None)[2]["2"] == [5]
    assert e.placement("pin", 4, 1)[0]  # the draft's own cache takes its own pins
    assert not e.placement("pin", 0, 1)[0]  # layer 0 is dense: no cache
    assert not e.placement("pin", 2, 99)[0]
    assert not e.placement("shuffle", 2, 1)[0]
    ok, _, pinned = e.placement("reset", None, None)
    assert ok and all(v == [] for v in pinned.values())
    e.generate([_prompts()[0]], SP)
    assert target.cache[2].pinned == set() and draft.cache[4].pinned == set()
    # A whole plan in one request (the placement manager's): every layer checked before any is queued.
    assert e.experts.cache_slots() == {"1": 8, "2": 8, "3": 8, "4": 8}
    assert not e.placement("set", None, None, {"2": [1, 3], "3": list(range(8))})[0]  # no slot left for misses
    assert not e.placement("set", None, None, {"2": [1, 3], "0": [1]})[0]  # a dense layer
    assert e.placement("get", None, None)[2]["2"] == []  # nothing of the refused plans was queued
    ok, _, pinned = e.placement("set", None, None, {"2": [1, 3], "4": [0]})
    assert ok and pinned["2"] == [1, 3] and pinned["4"] == [0] and pinned["1"] == []
    e.generate([_prompts()[0]], SP)
    assert target.cache[2].pinned == {1, 3} and draft.cache[4].pinned == {0}


def _offload_engine(checkpoint: str, policy: str) -> LLMEngine:
    """The offload engine, 8 of the tiny model's 16 experts a layer cached; skipped where no CPU kernel builds."""
    from moed.offload.cpu_experts import CpuKernelUnavailable

    per_layer = 8 * 49152  # 8 of the tiny model's 16 experts (bf16 gate, up, down of 64 x 128)
    try:
        return LLMEngine(
            EngineConfig(
                model=checkpoint, moe="offload", expert_cache_gb=3 * per_layer / 2**30, miss_service=policy, **BASE
            )
        )
    except CpuKernelUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("policy", ["hybrid", "cpu"])
def test_engine_offload_cpu_miss_service_matches_reference(tiny_checkpoint, reference, policy):
    # CPU experts differ from the GPU path only in fp32 summation order (tests/offload/test_runner.py states the
    # bound); on this fp32 model that never moves a greedy token.
    e = _offload_engine(tiny_checkpoint, policy)
    target = e.runner.moe
    # both policies hand the CPU its jobs through stream signals: decode steps stay capturable
    assert target.miss_service == policy and target.supports_cuda_graphs
    # Without a GPU the copy rate is a placeholder and the tiny experts' CPU rate is all overhead: make the two
    # equal so the hybrid split gives the CPU a share here as it does on the GPU machine.
    target.hybrid.cpu_rate = target.hybrid.copy_rate
    assert e.generate(_prompts(), SP) == reference
    stats = e.stats()
    assert stats.miss_service == policy and set(stats.miss_service_rates_Bps) == {"cpu", "copy"}
    cpu = sum(s.cpu_experts for s in stats.experts)
    assert cpu > 0 and (policy == "hybrid" or all(s["copy"] == 0 for s in target.hybrid.split_log))


@pytest.mark.parametrize("policy", ["copy", "hybrid"])
def test_engine_offload_on_a_cpu_without_the_triton_interpreter(tiny_checkpoint, reference, policy, monkeypatch):
    # `moed serve --device cpu --moe offload`: Triton has no CPU backend, so the cache's claim and copy steps (and
    # the hybrid split) take their torch references instead of failing every request at its first step.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    e = _offload_engine(tiny_checkpoint, policy)
    assert e.generate(_prompts(), SP) == reference
    assert sum(s.misses for s in e.stats().experts) > 0


@pytest.fixture(scope="module")
def int4_reference(tiny_int4_checkpoint, tiny_checkpoint) -> dict[str, list[list[int]]]:
    """The torch runner's tokens, experts held as int4: from the pack-quantized checkpoint, and from the bf16 one
    quantised at load (whose quantiser fits each group's range: other experts than the checkpoint writer's)."""
    out = {}
    for source, path, kw in (("int4", tiny_int4_checkpoint, {}), ("bf16", tiny_checkpoint, {"expert_dtype": "int4"})):
        e = LLMEngine(EngineConfig(model=path, **kw, **BASE))
        out[source] = [e.generate([p], SP)[0] for p in _prompts()]
    return out


@pytest.mark.parametrize(("source", "miss_service"), [("int4", "copy"), ("int4", "hybrid"), ("bf16", "copy")])
def test_engine_offload_int4_matches_the_torch_runner(
    tiny_int4_checkpoint, tiny_checkpoint, int4_reference, source, miss_service
):
    """int4 experts through the offload runner (host store, slot pools, copies; the CPU kernel with hybrid), from a
    pack-quantized checkpoint or quantised at load from bf16, against the torch runner on the same experts, target
    and MTP draft each with a cache smaller than their experts."""
    from moed.model.config import GlmMoeDsaConfig
    from moed.offload.cpu_experts import CpuKernelUnavailable
    from moed.offload.host_store import ExpertLayout

    path = tiny_int4_checkpoint if source == "int4" else tiny_checkpoint
    kw = {"expert_dtype": "int4"} if source == "bf16" else {}
    per_layer = 8 * ExpertLayout.for_config(GlmMoeDsaConfig.from_file(tiny_int4_checkpoint)).expert_bytes
    try:
        e = LLMEngine(
            EngineConfig(
                model=path,
                moe="offload",
                expert_cache_gb=3 * per_layer / 2**30,
                spec_steps=1,
                draft_expert_cache_gb=per_layer / 2**30,
                miss_service=miss_service,
                **kw,
                **BASE,
            )
        )
    except CpuKernelUnavailable as err:
        pytest.skip(str(err))
    target = e.runner.moe
    assert target.layout.is_int4 and e.drafter.moe.layout.is_int4 and target.cache[1].num_slots == 8
    if miss_service == "hybrid":
        target.hybrid.cpu_rate = target.hybrid.copy_rate  # a CPU share here too (see the test above)
    assert e.generate(_prompts(), SP) == int4_reference[source]
    stats = e.stats()
    assert sum(s.misses for s in stats.experts) > 0
    assert miss_service == "copy" or sum(s.cpu_experts for s in stats.experts) > 0


def test_engine_miss_service_config_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match="miss_service must be one of"):
        LLMEngine(EngineConfig(model=tiny_checkpoint, moe="offload", miss_service="gpu", **BASE))
    with pytest.raises(ValueError, match="needs moe='offload'"):
        LLMEngine(EngineConfig(model=tiny_checkpoint, miss_service="hybrid", **BASE))


def test_engine_reference_moe_refuses_placement(tiny_checkpoint):
    e = LLMEngine(EngineConfig(model=tiny_checkpoint, **BASE))
    ok, msg, pinned = e.placement("pin", 1, 1)
    assert not ok and "moe=offload" in msg and pinned == {}
    with pytest.raises(ValueError, match="expert_cache_gb must be given"):
        LLMEngine(EngineConfig(model=tiny_checkpoint, moe="offload", **BASE))
    with pytest.raises(ValueError, match="moe must be one of"):
        LLMEngine(EngineConfig(model=tiny_checkpoint, moe="fast", **BASE))
