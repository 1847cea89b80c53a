"""OffloadMoERunner on CPU: bit-exact against the all-resident runner, CPU experts, slot safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moed.formats import int4
from moed.formats.fp8 import quantize_block_fp8
from moed.kernels.fused_moe_reference import fused_moe_reference
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import ExpertWeights
from moed.offload.expert_cache import CacheConfig, CacheConfigError
from moed.offload.host_store import ExpertLayout, HostStoreError
from moed.offload.hybrid import CpuConfig
from moed.offload.runner import OffloadMoERunner

LAYERS = [1, 2]


def small_config(
    experts: int = 16, fp8: bool = True, inter: int = 64, block: int = 32, int4_experts: bool = False
) -> GlmMoeDsaConfig:
    raw = make_config("tiny", experts=experts, fp8=fp8, int4_experts=int4_experts)
    raw["moe_intermediate_size"] = inter
    if fp8:
        raw["quantization_config"]["weight_block_size"] = [block, block]
    return GlmMoeDsaConfig.from_dict(raw, source="offload test config")


def random_experts(cfg: GlmMoeDsaConfig, seed: int = 0) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    out = []
    for e in range(cfg.n_routed_experts):
        if cfg.pack_quantization is not None:  # int4; every third expert symmetric (no zero points), as W4A16 stores
            q = [
                int4.quantize_int4(torch.randn(*shape, generator=g) / shape[1] ** 0.5)
                for shape in ((I, H), (I, H), (H, I))
            ]
            out.append(ExpertWeights.from_int4(*(w._replace(zeros=None) if e % 3 == 0 else w for w in q)))
            continue
        parts = {}
        for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            w = torch.randn(*shape, generator=g) / shape[1] ** 0.5
            if cfg.quantization is not None:
                q = cfg.quantization
                parts[f"{name}_proj"], parts[f"{name}_scale_inv"] = quantize_block_fp8(w, q.block_n, q.block_k)
            else:
                parts[f"{name}_proj"] = w.bfloat16()
        out.append(ExpertWeights(**parts))
    return out


def build_runner(
    cfg: GlmMoeDsaConfig, experts: list[ExpertWeights], layers: list[int], device: str = "cpu", **kw
) -> OffloadMoERunner:
    r = OffloadMoERunner(cfg, layers=layers, device=device, **kw)
    for layer in layers:
        for e, w in enumerate(experts):
            r.load_expert(layer, e, w)
    r.finish_loading()
    return r


def random_routing(tokens: int, num_experts: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)]).to(torch.int32)
    return ids, torch.rand(tokens, k, generator=gen)


@pytest.fixture(scope="module")
def fp8_setup():
    cfg = small_config(experts=16, fp8=True, inter=48)  # 48 % 32 != 0: gate/up padding is exercised
    experts = random_experts(cfg, seed=1)
    ref = build_runner(cfg, experts, LAYERS, slots=cfg.n_routed_experts)
    return cfg, experts, ref


@pytest.mark.parametrize("slots", [1, 2, 5, 11, 16])
@pytest.mark.parametrize("policy,copy_path", [("lru", "sm"), ("lfu", "ce")])
def test_offload_equals_all_resident_bit_for_bit(fp8_setup, slots, policy, copy_path):
    cfg, experts, ref = fp8_setup
    assert ref.cache[1].static
    r = build_runner(cfg, experts, LAYERS, slots=slots, cache=CacheConfig(policy=policy, copy_path=copy_path))
    g = torch.Generator().manual_seed(slots)
    k = cfg.num_experts_per_tok
    for step in range(3):
        tokens = (1, 3, 2)[step]
        h = torch.randn(tokens, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(tokens, cfg.n_routed_experts, k, g)
        for layer in LAYERS:
            a = ref.run(layer, h, ids, w)
            b = r.run(layer, h, ids, w)
            assert torch.equal(a, b), (slots, step, layer, (a.float() - b.float()).abs().max())
    s = r.stats()[0]
    if slots < cfg.n_routed_experts:
        assert s.steps == 3 and s.misses > 0
    else:
        assert s.steps == 0 and s.bytes_copied_sm == 0  # all resident: no claim, no copy


def count_computed_routes(r: OffloadMoERunner) -> list[int]:
    """From now on, the routes each fused-MoE launch of `r` computes (those with a real expert id), one a launch."""
    launches: list[int] = []
    real, E = r.moe_fn, r.layout.num_experts

    def counting(hidden, w13, w2, ids, *a, **kw):
        launches.append(int((ids < E).sum()))
        return real(hidden, w13, w2, ids, *a, **kw)

    r.moe_fn = counting
    return launches


def test_offload_rounds_compute_each_route_once_and_match_the_per_route_formula(fp8_setup):
    """A step whose experts take several rounds computes each route in exactly one round (not every route in every
    round), and its output is what the runner has always produced: each route as a row of its own through the
    reference (the repeated-hidden formula), weighed in fp32, j in order."""
    cfg, experts, _ = fp8_setup
    r = build_runner(cfg, experts, [1], slots=3)
    computed = count_computed_routes(r)
    g = torch.Generator().manual_seed(9)
    k = cfg.num_experts_per_tok
    M = 6
    h = torch.randn(M, cfg.hidden_size, generator=g).bfloat16()
    ids, w = random_routing(M, cfg.n_routed_experts, k, g)
    out = r.run(1, h, ids, w)
    rounds = r.cache[1].rounds_for(min(cfg.n_routed_experts, M * k))
    assert len(computed) == rounds > 1
    assert sum(computed) == M * k  # each route once over the rounds
    ref = build_runner(cfg, experts, [1], slots=cfg.n_routed_experts).cache[1]
    rep = h[:, None, :].expand(M, k, -1).reshape(M * k, -1)
    per_route = fused_moe_reference(
        rep,
        ref.w13,
        ref.w2,
        ids.view(-1, 1),
        torch.ones(M * k, 1),
        ref.tables.expert_to_slot,
        w13_scale=ref.w13_scale,
        w2_scale=ref.w2_scale,
        block_shape=ref.layout.block,
    )
    want = (per_route.view(M, k, -1).float() * w[..., None]).sum(dim=1).to(h.dtype)
    assert torch.equal(out, want)


def test_offload_with_pins_bit_for_bit_and_pins_stay_resident(fp8_setup):
    cfg, experts, ref = fp8_setup
    r = build_runner(cfg, experts, LAYERS, slots=4)
    pins = {1: {3, 7}, 2: {0}}
    for layer, p in pins.items():
        r.cache[layer].set_pins(p)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        h = torch.randn(2, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(2, cfg.n_routed_experts, cfg.num_experts_per_tok, g)
        for layer in LAYERS:
            assert torch.equal(ref.run(layer, h, ids, w), r.run(layer, h, ids, w))
            resident = r.cache[layer].resident()
            assert pins[layer] <= set(resident)
    with pytest.raises(CacheConfigError, match="exceed its pin budget of 2"):
        r.cache[1].set_pins({0, 1, 2})


def test_offload_rounds_do_not_change_when_pins_are_set(fp8_setup):
    """A decode graph replays the rounds counted at capture: pins set later (the placement manager's, 30 s into
    serving) must not make a step need more, or the routes past the last round stay unserved. Rounds are sized for
    the pin budget from the start, and that many still serve every route once the budget is pinned."""
    cfg, experts, ref = fp8_setup
    r = build_runner(cfg, experts, [1], slots=4)
    lc = r.cache[1]
    k, M = cfg.num_experts_per_tok, 6
    distinct = min(cfg.n_routed_experts, M * k)
    captured = lc.rounds_for(distinct)
    assert lc.max_pins == 2 and captured == -(-distinct // (4 - 2))
    served = count_computed_routes(r)
    lc.set_pins({3, 7})
    assert lc.rounds_for(distinct) == captured
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        served.clear()
        h = torch.randn(M, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(M, cfg.n_routed_experts, k, g)
        assert torch.equal(ref.run(1, h, ids, w), r.run(1, h, ids, w))
        assert len(served) == captured and sum(served) == M * k


def test_offload_bf16_matches_torch_reference():
    cfg = small_config(experts=8, fp8=False, inter=32)
    experts = random_experts(cfg, seed=2)
    r = build_runner(cfg, experts, [1], slots=3)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, cfg.hidden_size, generator=g).bfloat16()
    ids, w = random_routing(3, 8, cfg.num_experts_per_tok, g)
    out = r.run(1, h, ids, w)
    # Independent reference: per-expert fp32 loop over the original (unpacked) weights.
    ref = torch.zeros(3, cfg.hidden_size)
    for t in range(3):
        for j in range(ids.shape[1]):
            e = experts[int(ids[t, j])]
            x = h[t].float()
            y = (torch.nn.functional.silu(e.gate_proj.float() @ x) * (e.up_proj.float() @ x)) @ e.down_proj.float().T
            ref[t] += w[t, j] * y.bfloat16().float()
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_offload_no_slot_in_use_is_evicted(fp8_setup):
    """After every round, each expert the round computes with sits in its slot, byte for byte."""
    cfg, experts, _ = fp8_setup
    r = build_runner(cfg, experts, [1], slots=3)
    lc = r.cache[1]
    g = torch.Generator().manual_seed(9)
    host = r.store.sections(1)
    for _ in range(4):
        ids, _ = random_routing(3, cfg.n_routed_experts, cfg.num_experts_per_tok, g)
        round_ids = torch.empty_like(ids)
        mask = torch.empty(ids.shape, dtype=torch.int8)
        served: set[int] = set()
        for rnd in range(lc.rounds_for(ids.numel())):
            lc.serve_round(ids, rnd, round_ids, mask)
            used = set(ids.flatten()[mask.flatten() != 0].tolist())
            assert not used & served, "an expert was served twice in one step"
            served |= used
            e2s = lc.tables.expert_to_slot
            for e in used:
                s = int(e2s[e])
                assert s >= 0 and int(lc.tables.slot_to_expert[s]) == e
                for name, w in lc.weights.items():
                    assert torch.equal(w[s].view(torch.uint8), host[name][e].view(torch.uint8)), (e, s, name)
        assert served == set(ids.flatten().tolist())


def test_offload_cpu_experts_within_accumulation_tolerance(fp8_setup, monkeypatch):
    """CPU-computed routes vs the same routes on the slot path.

    Both compute one expert in fp32 from the same FP8 bytes and scales; they differ in summation order
    (the CPU keeps two 16-lane chains per 128-column block, torch sums its own way: a few fp32 ulps) and
    in rounding: the slot path rounds each route output to bf16 before the weighted fp32 sum, the CPU
    sums its routes in fp32 unrounded. So each route differs by at most one bf16 rounding (2^-8
    relative) and the weighted sum (fp32, k terms, weights <= 1) by k * 2^-8 * max|route| in absolute
    terms, plus the final bf16 rounding of the sum. Checked here with that bound.
    """
    cfg, experts, ref = fp8_setup
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9))
    g = torch.Generator().manual_seed(11)
    k = cfg.num_experts_per_tok
    for _ in range(3):
        h = torch.randn(3, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(3, cfg.n_routed_experts, k, g)
        a = ref.run(1, h, ids, w).float()
        b = r.run(1, h, ids, w).float()
        route_max = 0.0
        for t in range(3):  # magnitude bound of the route outputs (fp32 reference)
            route_max = max(route_max, float(a[t].abs().max()))
        assert (a - b).abs().max() <= k * 2**-8 * max(route_max, 1.0) + 2**-8 * float(a.abs().max())
    st = r.stats()[0]  # takes in the server's records first
    assert any(s["cpu"] > 0 for s in r.hybrid.split_log), "no expert was computed on the CPU"
    assert all(s["cpu"] + s["copy"] == s["misses"] and s["tokens"] == 3 for s in r.hybrid.split_log)
    assert st.cpu_experts == sum(s["cpu"] for s in r.hybrid.split_log if s["layer"] == 1) and st.bytes_cpu > 0
    assert r.hybrid.server.errors == 0
    r.close()


def test_torch_moe_reference_rejects_missing_slot(fp8_setup):
    cfg, _, ref = fp8_setup
    lc = ref.cache[1]
    table = lc.tables.expert_to_slot.clone()
    table[2] = -1
    with pytest.raises(ValueError, match="expert 2 has no slot"):
        fused_moe_reference(
            torch.zeros(1, cfg.hidden_size),
            lc.w13,
            lc.w2,
            torch.tensor([[2]], dtype=torch.int32),
            torch.ones(1, 1),
            table,
            w13_scale=lc.w13_scale,
            w2_scale=lc.w2_scale,
            block_shape=ref.layout.block,
        )


def test_offload_runner_rejects_bad_layers_and_config():
    cfg = small_config()
    with pytest.raises(ValueError, match="not MoE layers"):
        build_runner(cfg, [], [0])
    with pytest.raises(CacheConfigError, match="policy"):
        CacheConfig(policy="fifo")
    with pytest.raises(CacheConfigError, match="copy path"):
        CacheConfig(copy_path="dma")
    for decay in (0.0, 1.5):
        with pytest.raises(CacheConfigError, match="lfu_decay"):
            CacheConfig(lfu_decay=decay)


def test_cache_kernels_run_on_cuda_or_in_the_interpreter_else_their_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not CacheConfig().kernels_on(torch.device("cpu"))  # Triton has no CPU backend
    assert CacheConfig().kernels_on(torch.device("cuda"))
    assert CacheConfig(use_kernels=True).kernels_on(torch.device("cpu"))  # an explicit choice wins
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert CacheConfig().kernels_on(torch.device("cpu"))


def test_offload_with_fused_moe_kernel_bit_for_bit():
    """The same property through the Triton fused-MoE kernel (interpreter, bf16: its FP8 path needs block_k 128)."""
    from moed.kernels.fused_moe import fused_moe_routes

    cfg = small_config(experts=8, fp8=False, inter=32)
    experts = random_experts(cfg, seed=2)
    ref = build_runner(cfg, experts, [1], slots=8, moe_fn=fused_moe_routes)
    r = build_runner(cfg, experts, [1], slots=3, moe_fn=fused_moe_routes)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        h = torch.randn(3, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(3, 8, cfg.num_experts_per_tok, g)
        assert torch.equal(ref.run(1, h, ids, w), r.run(1, h, ids, w))


def test_offload_stats_match_protocol_fields(fp8_setup):
    from moed.engine.protocol import LayerExpertStats

    cfg, experts, _ = fp8_setup
    r = build_runner(cfg, experts, [1], slots=3)
    g = torch.Generator().manual_seed(1)
    ids, w = random_routing(2, cfg.n_routed_experts, cfg.num_experts_per_tok, g)
    r.run(1, torch.randn(2, cfg.hidden_size, generator=g).bfloat16(), ids, w)
    s = r.stats()[0]
    msg = LayerExpertStats(**s.as_protocol_fields())
    # bytes copied: the misses (UVA kernel) plus the 3 experts loaded at start-up (copy engine)
    assert msg.misses == s.misses > 0 and msg.bytes_copied == (s.misses + 3) * r.layout.expert_bytes
    counts = r.read_counts()[1]
    assert sum(counts) == ids.numel() and sum(r.read_counts()[1]) == 0


def test_offload_cpu_experts_skip_steps_below_min_tokens(fp8_setup):
    """Steps of fewer than cpu.min_tokens tokens copy every miss; the others split them."""
    cfg, experts, _ = fp8_setup
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9, min_tokens=2))
    g = torch.Generator().manual_seed(5)
    k = cfg.num_experts_per_tok
    for _ in range(3):
        ids, w = random_routing(1, cfg.n_routed_experts, k, g)
        r.run(1, torch.randn(1, cfg.hidden_size, generator=g).bfloat16(), ids, w)
    assert r.stats()[0].misses > 0 and len(r.hybrid.split_log) == 0
    for _ in range(3):
        ids, w = random_routing(2, cfg.n_routed_experts, k, g)
        r.run(1, torch.randn(2, cfg.hidden_size, generator=g).bfloat16(), ids, w)
    r.stats()
    assert r.hybrid.split_log and all(s["cpu"] > 0 for s in r.hybrid.split_log)
    with pytest.raises(ValueError, match="min_tokens <= max_tokens"):
        CpuConfig(min_tokens=0)
    r.close()


def test_offload_hybrid_split_follows_rates_and_policy(fp8_setup):
    """The split table: equal rates halve the misses (ties to the CPU), a CPU 3x faster takes 3 of 4, policy cpu
    takes all; every entry within [0, misses]."""
    cfg, experts, _ = fp8_setup
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9))
    t = r.hybrid.counts.numpy()
    assert t.shape == (9, 8 * cfg.num_experts_per_tok + 1)
    assert list(t[1, :6]) == [0, 1, 1, 2, 2, 3]
    r.hybrid.cpu_rate = 3e9
    assert t[1, 4] == 3 and t[1, 8] == 6
    r.close()
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, policy="cpu"))
    t = r.hybrid.counts.numpy()
    assert (t == np.arange(t.shape[1])[None, :]).all()
    r.close()


def test_offload_cpu_experts_unavailable_falls_back_only_when_asked(fp8_setup, monkeypatch):
    from moed.offload import hybrid as hybrid_mod
    from moed.offload.cpu_experts import CpuKernelUnavailable

    def no_compiler(*a, **kw):
        raise CpuKernelUnavailable("no C compiler (gcc) to build the CPU expert kernel")

    monkeypatch.setattr(hybrid_mod, "CpuExpertKernel", no_compiler)
    cfg, experts, _ = fp8_setup
    with pytest.raises(CpuKernelUnavailable, match="no C compiler"):
        build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1))
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, fallback_to_copy=True))
    assert r.miss_service == "copy" and r.hybrid is None


@pytest.fixture(scope="module")
def int4_setup():
    cfg = small_config(experts=16, fp8=False, inter=128, int4_experts=True)  # 128: the CPU's int8 path applies
    experts = random_experts(cfg, seed=3)
    ref = build_runner(cfg, experts, LAYERS, slots=cfg.n_routed_experts)
    return cfg, experts, ref


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_offload_int4_equals_all_resident_and_the_dequantised_experts(int4_setup, slots):
    """int4 experts through the store, the slot pools (six sections) and the copies: bit for bit the all-resident
    answer at any cache size, and that answer is the experts' dequantised weights computed in fp32."""
    cfg, experts, ref = int4_setup
    assert ref.layout.is_int4 and set(ref.cache[1].weights) == {
        "w13",
        "w2",
        "w13_scale",
        "w2_scale",
        "w13_zeros",
        "w2_zeros",
    }
    r = build_runner(cfg, experts, LAYERS, slots=slots)
    fp8 = ExpertLayout(16, cfg.hidden_size, 128, 128, torch.float8_e4m3fn, (128, 128))
    assert r.layout.expert_bytes < fp8.expert_bytes / 1.8  # about half an FP8 slot
    g = torch.Generator().manual_seed(slots)
    k = cfg.num_experts_per_tok
    for tokens in (1, 3):
        h = torch.randn(tokens, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(tokens, cfg.n_routed_experts, k, g)
        for layer in LAYERS:
            assert torch.equal(ref.run(layer, h, ids, w), r.run(layer, h, ids, w))
        out = r.run(1, h, ids, w).float()
        want = torch.zeros(tokens, cfg.hidden_size)
        for t in range(tokens):
            for j in range(k):
                gate, up, down = experts[int(ids[t, j])].dequantized(None, torch.float32)
                x = h[t].float()
                y = (torch.nn.functional.silu(gate @ x) * (up @ x)).bfloat16().float() @ down.T
                want[t] += w[t, j] * y.bfloat16().float()
        assert torch.allclose(out, want, rtol=2e-2, atol=2e-2)
    if slots < cfg.n_routed_experts:
        assert r.stats()[0].misses > 0


def test_offload_int4_cpu_experts_within_int8_activation_error(int4_setup):
    """CPU-computed int4 routes (int8 activations) against the all-resident GPU-path answer: within the error int8
    activations cost (~1.6% of a route's output on Gaussian inputs, docs/benchmarks.md); the split and the stats as
    for FP8."""
    cfg, experts, ref = int4_setup
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9))
    g = torch.Generator().manual_seed(12)
    for _ in range(3):
        h = torch.randn(3, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(3, cfg.n_routed_experts, cfg.num_experts_per_tok, g)
        a, b = ref.run(1, h, ids, w).float(), r.run(1, h, ids, w).float()
        assert float((a - b).norm() / a.norm()) < 3e-2
    st = r.stats()[0]
    assert any(s["cpu"] > 0 for s in r.hybrid.split_log) and st.bytes_cpu == st.cpu_experts * r.layout.expert_bytes
    assert r.hybrid.server.errors == 0
    r.close()


def test_offload_int4_store_refuses_other_formats(int4_setup):
    cfg, _, _ = int4_setup
    bf16 = random_experts(small_config(experts=16, fp8=False, inter=128), seed=0)[0]
    r = OffloadMoERunner(cfg, layers=[1], device="cpu", slots=2)
    with pytest.raises(HostStoreError, match=r"weights are bf16.*holds int4 experts.*expert_dtype 'int4'"):
        r.load_expert(1, 0, bf16)
    q = [int4.quantize_int4(torch.randn(*s), 32) for s in ((128, 128), (128, 128), (128, 128))]
    with pytest.raises(HostStoreError, match="group size 32, the store holds group 128"):
        r.load_expert(1, 0, ExpertWeights.from_int4(*q))


def _column_split_runs(cfg, experts, ref, tol_fn) -> OffloadMoERunner:
    """Steps of 1-3 tokens through the hybrid service with the column split on (equal rates: a step with an odd
    number of misses splits one expert in half), each against the all-resident torch reference MoE."""
    cpu = CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9, column_split=True)
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=cpu)
    assert r.hybrid.column_split
    g = torch.Generator().manual_seed(21)
    k = cfg.num_experts_per_tok
    for tokens in (1, 2, 3, 1, 3):
        h = torch.randn(tokens, cfg.hidden_size, generator=g).bfloat16()
        ids, w = random_routing(tokens, cfg.n_routed_experts, k, g)
        a, b = ref.run(1, h, ids, w).float(), r.run(1, h, ids, w).float()
        tol_fn(a, b)
        split_e = int(r.hybrid.split_info[0])
        if split_e >= 0:  # the split expert's columns sat in the scratch, never in the cache
            assert int(r.cache[1].tables.expert_to_slot[split_e]) == -1
    r.hybrid.refresh()
    log = list(r.hybrid.split_log)
    assert any(s["split"] == 0.5 for s in log), "no step split an expert by columns"
    assert all(s["cpu"] + s["copy"] + (s["split"] > 0) == s["misses"] for s in log)
    assert r.hybrid.server.errors == 0
    return r


def test_offload_hybrid_column_split_fp8_matches_reference(fp8_setup):
    """FP8 (block 32, N padded to 64: two column blocks): the boundary expert's columns [0, 32) on the GPU from the
    scratch, [32, 64) on the CPU; the layer output within the hybrid path's tolerance of the reference (as above)."""
    cfg, experts, ref = fp8_setup
    k = cfg.num_experts_per_tok

    def tol(a: torch.Tensor, b: torch.Tensor) -> None:
        assert (a - b).abs().max() <= k * 2**-8 * max(float(a.abs().max()), 1.0) + 2**-8 * float(a.abs().max())

    r = _column_split_runs(cfg, experts, ref, tol)
    t, cols = r.hybrid.counts.numpy(), r.hybrid.split_cols.numpy()
    assert list(t[1, :6]) == [0, 0, 1, 1, 2, 2] and list(cols[1, :6]) == [0, 32, 0, 32, 0, 32]
    r.close()


def test_offload_hybrid_column_split_int4_matches_reference():
    """int4 (group 128, N = 256: two column groups): as for FP8, within the int8-activation error of the CPU's part."""
    cfg = small_config(experts=16, fp8=False, inter=256, int4_experts=True)
    experts = random_experts(cfg, seed=4)
    ref = build_runner(cfg, experts, LAYERS, slots=cfg.n_routed_experts)

    def tol(a: torch.Tensor, b: torch.Tensor) -> None:
        assert float((a - b).norm() / a.norm()) < 3e-2

    _column_split_runs(cfg, experts, ref, tol).close()


def test_offload_hybrid_column_split_off_by_default_and_where_it_cannot_apply(fp8_setup, int4_setup):
    cfg, experts, _ = fp8_setup
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9))
    assert not r.hybrid.column_split and not hasattr(r.hybrid, "split_cols")
    r.close()
    cfg, experts, _ = int4_setup  # N = 128: one column group, nothing to split
    cpu = CpuConfig(threads=1, cpu_rate=1e9, copy_rate=1e9, column_split=True)
    r = build_runner(cfg, experts, LAYERS, slots=4, cpu=cpu)
    assert not r.hybrid.column_split
    r.close()


def test_offload_long_step_weighs_routes_in_chunks_with_the_same_bits(fp8_setup, monkeypatch):
    """A step longer than WEIGHTED_SUM_TOKENS sums its weighted routes a chunk at a time (bounded fp32 products),
    giving the bits of the one-go sum: the all-resident runner's output is unchanged by the chunking."""
    from moed.offload import runner

    cfg, experts, ref = fp8_setup
    g = torch.Generator().manual_seed(5)
    tokens = 11
    h = torch.randn(tokens, cfg.hidden_size, generator=g).bfloat16()
    ids, w = random_routing(tokens, cfg.n_routed_experts, cfg.num_experts_per_tok, g)
    whole = ref.run(LAYERS[0], h, ids, w)
    monkeypatch.setattr(runner, "WEIGHTED_SUM_TOKENS", 4)  # three chunks: 4, 4, 3
    assert torch.equal(ref.run(LAYERS[0], h, ids, w), whole)
    r = build_runner(cfg, experts, LAYERS, slots=3, cache=CacheConfig())  # rounds, then the chunked sum
    assert torch.equal(r.run(LAYERS[0], h, ids, w), whole)
