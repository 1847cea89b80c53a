"""GPU-only expert-cache tests: a decode step with misses never syncs the host; the miss path replays
inside a CUDA graph with new expert ids and gives the right output; the UVA copy kernel matches its
reference on pinned memory."""

from __future__ import annotations

import pytest
import torch

from moed.formats import int4
from moed.formats.fp8 import quantize_block_fp8
from moed.kernels.expert_claim import SlotTables, claim_slots
from moed.kernels.expert_copy import copy_experts, copy_experts_reference, upload_no_ce
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import ExpertWeights
from moed.offload.hybrid import CpuConfig
from moed.offload.runner import OffloadMoERunner

pytestmark = pytest.mark.gpu
E, K, N, k = 32, 256, 256, 8


def _runner(slots: int, cpu: CpuConfig | None = None, moe_fn=None, fmt: str = "fp8") -> OffloadMoERunner:
    raw = make_config("tiny", experts=E, fp8=fmt == "fp8")
    raw.update(hidden_size=K, moe_intermediate_size=N, num_experts_per_tok=k)
    cfg = GlmMoeDsaConfig.from_dict(raw, source="gpu offload test")
    g = torch.Generator().manual_seed(0)
    r = OffloadMoERunner(
        cfg,
        layers=[1],
        device="cuda",
        slots=slots,
        cpu=cpu,
        moe_fn=moe_fn,
        expert_dtype="int4" if fmt == "int4" else "checkpoint",
    )
    for e in range(E):
        parts = {}
        for name, shape in (("gate", (N, K)), ("up", (N, K)), ("down", (K, N))):
            w = torch.randn(*shape, generator=g) / shape[1] ** 0.5
            parts[name] = int4.quantize_int4(w) if fmt == "int4" else quantize_block_fp8(w, 128, 128)
        if fmt == "int4":
            r.load_expert(1, e, ExpertWeights.from_int4(parts["gate"], parts["up"], parts["down"]))
        else:
            r.load_expert(
                1,
                e,
                ExpertWeights(
                    **{
                        f"{n}_{suffix}": t
                        for n, (q, sc) in parts.items()
                        for suffix, t in (("proj", q), ("scale_inv", sc))
                    }
                ),
            )
    r.finish_loading()
    return r


def _ids(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    return ids.cuda(), torch.rand(tokens, k, generator=g).cuda()


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_expert_cache_decode_step_with_misses_has_no_host_sync(fmt):
    ref, r = _runner(E, fmt=fmt), _runner(9, fmt=fmt)
    h = torch.randn(1, K, device="cuda").bfloat16()
    ids, w = _ids(1, 1)
    r.run(1, h, ids, w)  # compile outside the checked region
    torch.cuda.synchronize()
    for seed in range(2, 5):
        ids, w = _ids(1, seed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = r.run(1, h, ids, w)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(out, ref.run(1, h, ids, w))
    assert r.stats()[0].misses > 0


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_expert_cache_miss_path_replays_in_cuda_graph_with_new_ids(fmt):
    ref, r = _runner(E, fmt=fmt), _runner(10, fmt=fmt)
    tokens = 2
    static_h = torch.randn(tokens, K, device="cuda").bfloat16()
    static_ids, static_w = _ids(tokens, 7)
    for _ in range(2):  # warm-up: compile every kernel before capture
        r.run(1, static_h, static_ids, static_w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        static_out = r.run(1, static_h, static_ids, static_w)
    torch.cuda.current_stream().wait_stream(s)
    misses_before = r.stats()[0].misses
    for seed in range(20, 26):
        ids, w = _ids(tokens, seed)
        h = torch.randn(tokens, K, device="cuda").bfloat16()
        static_ids.copy_(ids)
        static_w.copy_(w)
        static_h.copy_(h)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ref.run(1, h, ids, w)), seed
    assert r.stats()[0].misses > misses_before  # the replays really served misses


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_offload_hybrid_step_has_no_host_sync_and_replays_in_cuda_graph():
    """The hybrid miss service on the GPU: split on the device, the CPU's job handed over by stream memory
    operations: no host sync in an eager step, and a captured step replayed with new ids is right.

    Right means: no further from the FP8 reference (FP8 weights dequantised, fp32 math: `fused_moe_routes_reference`)
    than the all-GPU path, which quantises activations to FP8 per 128-group (w8a8, a few % per route) where the
    CPU computes with fp32 activations; plus one bf16 rounding. A wrong or stale CPU sum would be off by ~100%."""
    from moed.kernels.fused_moe_reference import fused_moe_routes_reference

    exact, gpu = _runner(E, moe_fn=fused_moe_routes_reference), _runner(E)
    r = _runner(10, CpuConfig(threads=4, cpu_rate=1e9, copy_rate=1e9))
    errs: list[tuple[float, float]] = []

    def check(out: torch.Tensor, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        want = exact.run(1, h, ids, w)
        errs.append((_rel(out, want), _rel(gpu.run(1, h, ids, w), want)))
        assert errs[-1][0] <= 1.25 * max(errs[-1][1], 2**-8), errs[-1]

    tokens = 2
    h = torch.randn(tokens, K, device="cuda").bfloat16()
    ids, w = _ids(tokens, 1)
    r.run(1, h, ids, w)  # compile outside the checked region
    torch.cuda.synchronize()
    for seed in range(2, 5):
        ids, w = _ids(tokens, seed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = r.run(1, h, ids, w)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        check(out, h, ids, w)
    static_h, (static_ids, static_w) = h.clone(), _ids(tokens, 7)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        static_out = r.run(1, static_h, static_ids, static_w)
    torch.cuda.current_stream().wait_stream(s)
    r.stats()
    r.hybrid.split_log.clear()
    for seed in range(20, 26):
        ids, w = _ids(tokens, seed)
        static_ids.copy_(ids)
        static_w.copy_(w)
        static_h.copy_(torch.randn(tokens, K, device="cuda").bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        check(static_out, static_h, ids, w)
    r.stats()
    assert len(r.hybrid.split_log) == 6 and all(s["cpu"] > 0 for s in r.hybrid.split_log)
    assert r.hybrid.server.errors == 0
    print("relative error vs the FP8 reference (hybrid, all-GPU w8a8):", [(round(a, 4), round(b, 4)) for a, b in errs])
    r.close()


def test_offload_int4_on_the_gpu_matches_the_reference_and_the_cpu_share():
    """int4 on the GPU: fused_moe_int4 over the slot pools (misses copied in) against the one torch reference on the
    same pools; the hybrid service with the rates it measures itself (the copy rate by the UVA kernel over the six
    sections), its CPU routes within the int8-activation error of the exact answer, replayed from a CUDA graph."""
    from moed.kernels.fused_moe_reference import fused_moe_routes_reference

    exact, r = _runner(E, moe_fn=fused_moe_routes_reference, fmt="int4"), _runner(9, fmt="int4")
    hyb = _runner(10, CpuConfig(threads=4), fmt="int4")
    assert r.layout.is_int4 and hyb.hybrid.copy_rate > 1e9 and hyb.hybrid.cpu_rate > 0
    assert hyb.hybrid.copy_rate <= 1.5 * hyb.hybrid.copy_rate_alone  # measured beside the busy CPU: not faster
    hyb.hybrid.cpu_rate = hyb.hybrid.copy_rate  # a CPU share whatever this host measured
    tokens = 2
    static_h = torch.randn(tokens, K, device="cuda").bfloat16()
    static_ids, static_w = _ids(tokens, 3)
    for _ in range(2):
        hyb.run(1, static_h, static_ids, static_w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        static_out = hyb.run(1, static_h, static_ids, static_w)
    torch.cuda.current_stream().wait_stream(s)
    for seed in range(30, 34):
        ids, w = _ids(tokens, seed)
        h = torch.randn(tokens, K, device="cuda").bfloat16()
        want = exact.run(1, h, ids, w)
        assert _rel(r.run(1, h, ids, w), want) < 1e-2  # bf16 activations and rounding only
        static_ids.copy_(ids)
        static_w.copy_(w)
        static_h.copy_(h)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(static_out, want) < 3e-2  # the CPU's routes with int8 activations
    hyb.stats()
    assert any(s["cpu"] > 0 for s in hyb.hybrid.split_log) and hyb.hybrid.server.errors == 0
    hyb.close()


def test_expert_cache_uva_copy_matches_reference_on_pinned_memory():
    t = SlotTables.allocate(E, 6, "cuda")
    src = [torch.randint(0, 255, (E, n), dtype=torch.uint8).pin_memory() for n in (40960, 4096 + 16, 64, 48)]
    dst = [torch.zeros(6, a.shape[1], dtype=torch.uint8, device="cuda") for a in src]
    ids = torch.tensor([[3, 9, 17, 30]], dtype=torch.int32, device="cuda")
    round_ids = torch.empty_like(ids)
    mask = torch.empty(ids.shape, dtype=torch.int8, device="cuda")
    claim_slots(t, ids, 0, round_ids, mask)
    copy_experts(t, src, dst)
    ref_dst = [torch.zeros_like(d) for d in dst]
    copy_experts_reference(t, src, ref_dst)
    for a, b in zip(dst, ref_dst):
        assert torch.equal(a, b)
    flags = torch.randint(0, 2, (257,), dtype=torch.int8).pin_memory()
    out = torch.empty(257, dtype=torch.int8, device="cuda")
    upload_no_ce(flags, out)
    assert torch.equal(out.cpu(), flags)


@pytest.mark.parametrize("policy", [0, 1])
def test_expert_cache_claim_kernel_matches_reference_on_the_device(policy):
    """The compiled claim kernel (not the interpreter) against its reference: random states, several rounds, a CPU
    share excluded, GLM-5.1's 256 experts with a 19-slot cache and a 64-token step."""
    from moed.kernels.expert_claim import claim_slots_reference

    g = torch.Generator().manual_seed(policy)
    for E_, S, M in ((256, 19, 64), (256, 38, 1), (16, 5, 3)):
        t = SlotTables.allocate(E_, S, "cpu")
        for s, e in enumerate(torch.randperm(E_, generator=g)[:S].tolist()):
            t.expert_to_slot[e], t.slot_to_expert[s] = s, e
        t.slot_last_use.copy_(torch.randint(0, 5, (S,), generator=g))
        t.step.fill_(5)
        t.expert_freq.copy_(torch.rand(E_, generator=g) * 3)
        t.slot_pinned[: S // 4] = 1
        dev = SlotTables(**{f: getattr(t, f).cuda() for f in t.__dataclass_fields__})
        for step in range(3):
            ids = torch.stack([torch.randperm(E_, generator=g)[:k] for _ in range(M)]).to(torch.int32)
            exclude = (torch.rand(E_, generator=g) < 0.2).to(torch.int8) if step == 1 else None
            rounds = -(-min(E_, M * k) // (S - S // 4))
            for r in range(rounds):
                ra, ma = torch.empty_like(ids), torch.empty(M, k, dtype=torch.int8)
                rb, mb = ra.cuda(), ma.cuda()
                claim_slots_reference(t, ids, r, ra, ma, policy=policy, exclude=exclude)
                claim_slots(
                    dev, ids.cuda(), r, rb, mb, policy=policy, exclude=exclude.cuda() if exclude is not None else None
                )
                n = int(t.n_copy)
                assert int(dev.n_copy) == n and torch.equal(ra, rb.cpu()) and torch.equal(ma, mb.cpu())
                for f in ("expert_to_slot", "slot_to_expert", "slot_last_use", "expert_count", "stats", "served"):
                    assert torch.equal(getattr(t, f), getattr(dev, f).cpu()), f
                assert torch.equal(t.copy_expert[:n], dev.copy_expert[:n].cpu())
                # fp32 frequency: the device may fuse the multiply-add (one rounding), the reference does not
                assert torch.allclose(t.expert_freq, dev.expert_freq.cpu(), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_offload_hybrid_column_split_on_the_gpu_no_sync_and_in_cuda_graph(fmt):
    """The column split on the GPU (N = 256: two column blocks of FP8 block 128 / int4 group 128): the partial UVA
    copy into the scratch and the fused-MoE pass over it queue no host sync, replay from a CUDA graph with new ids,
    and stay as close to the reference as the hybrid path without the split (FP8: the all-GPU w8a8 error plus a bf16
    rounding; int4: the CPU's int8-activation error)."""
    from moed.kernels.fused_moe_reference import fused_moe_routes_reference

    exact = _runner(E, moe_fn=fused_moe_routes_reference, fmt=fmt)
    r = _runner(10, CpuConfig(threads=4, cpu_rate=1e9, copy_rate=1e9, column_split=True), fmt=fmt)
    assert r.hybrid.column_split and list(r.hybrid.split_cols.numpy()[1, :4]) == [0, 128, 0, 128]
    tol = 3e-2 if fmt == "int4" else 6e-2
    tokens = 1
    h = torch.randn(tokens, K, device="cuda").bfloat16()
    ids, w = _ids(tokens, 1)
    r.run(1, h, ids, w)  # compile outside the checked region
    torch.cuda.synchronize()
    for seed in range(2, 6):
        ids, w = _ids(tokens, seed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = r.run(1, h, ids, w)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert _rel(out, exact.run(1, h, ids, w)) < tol
    static_h, (static_ids, static_w) = h.clone(), _ids(tokens, 7)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        static_out = r.run(1, static_h, static_ids, static_w)
    torch.cuda.current_stream().wait_stream(s)
    r.stats()
    r.hybrid.split_log.clear()
    for seed in range(40, 52):
        ids, w = _ids(tokens, seed)
        static_ids.copy_(ids)
        static_w.copy_(w)
        static_h.copy_(torch.randn(tokens, K, device="cuda").bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(static_out, exact.run(1, static_h, ids, w)) < tol
    r.stats()
    assert any(s["split"] > 0 for s in r.hybrid.split_log) and r.hybrid.server.errors == 0
    r.close()
