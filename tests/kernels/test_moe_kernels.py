"""Fused-MoE kernels (align, activation quant, gate-up / down GEMMs, top-k sum) against their torch twins.

Without CUDA the kernels run in the Triton interpreter at tiny shapes; `gpu` tests use GLM-5.1's widths.
"""

from __future__ import annotations

import pytest
import torch

from moed.formats.fp8 import quantize_block_fp8
from moed.kernels import fused_moe as fm
from moed.kernels import fused_moe_reference as fmr
from moed.kernels.act_quant import dequantize_groups_fp8, per_token_group_quant_fp8, per_token_group_quant_fp8_reference
from moed.kernels.moe_align import moe_align_block_size, moe_align_block_size_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {
    "BLOCK_SIZE_M": 16,
    "BLOCK_SIZE_N": 64,
    "BLOCK_SIZE_K": 128,
    "GROUP_SIZE_M": 1,
    "num_warps": 4,
    "num_stages": 3,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_weights(S: int, N: int, K: int, fp8: bool, seed: int, device: str = DEV):
    """Random experts drawn on `device` (fast on a GPU at GLM widths); FP8 ones block-quantised by moed.formats.fp8."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn((S, 2 * N, K), generator=gen, device=device) / K**0.5
    w2 = torch.randn((S, K, N), generator=gen, device=device) / N**0.5
    if not fp8:
        return w13.bfloat16(), w2.bfloat16(), None, None
    q13, s13 = zip(*(quantize_block_fp8(w, 128, 128) for w in w13))
    q2, s2 = zip(*(quantize_block_fp8(w, 128, 128) for w in w2))
    return torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2)


def slot_table(num_ids: int, S: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache-like table: S of num_ids ids hold permuted slots, the rest -1 (holes). Returns (table, ids with slot)."""
    have = torch.randperm(num_ids, generator=gen)[:S]
    table = torch.full((num_ids,), -1, dtype=torch.int32)
    table[have] = torch.randperm(S, generator=gen).to(torch.int32)
    return table.to(DEV), have


def routing(M: int, k: int, allowed: torch.Tensor, gen: torch.Generator):
    pick = (
        torch.stack([torch.randperm(allowed.numel(), generator=gen)[:k] for _ in range(M)])
        if M
        else torch.zeros((0, k), dtype=torch.long)
    )
    ids = allowed[pick].to(torch.int32).reshape(M, k)
    w = torch.rand((M, k), generator=gen)
    return ids.contiguous().to(DEV), w.to(DEV)


# ---- activation quant ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 128), (17, 384), (5, 200)])
def test_moe_act_quant_matches_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.logspace(-8, 3, shape[1])
    if shape[1] > 128:
        x[0, :128] = 0.0  # an all-zero group must give scale 1e-10/448 and zeros, not NaN
    x = x.to(torch.bfloat16).to(DEV)
    q, s = per_token_group_quant_fp8(x)
    q_ref, s_ref = per_token_group_quant_fp8_reference(x)
    assert q.shape == q_ref.shape and s.shape == s_ref.shape == (shape[0], -(-shape[1] // 128))
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q.float(), q_ref.float())
    assert rel(dequantize_groups_fp8(q, s), x) < 0.05
    if shape[1] > 128:
        assert float(s[0, 0]) == pytest.approx(1e-10 / 448) and not q[0, :128].float().any()


# ---- align --------------------------------------------------------------------------------------------------


def _check_alignment(ids: torch.Tensor, table: torch.Tensor, bm: int) -> None:
    got = moe_align_block_size(ids, table, bm)
    ref = moe_align_block_size_reference(ids, table, bm)
    n, T = int(ref.num_padded), ids.numel()
    assert int(got.num_padded) == n
    assert torch.equal(got.block_slot.cpu(), ref.block_slot.cpu())
    rows = got.sorted_ids.cpu()
    assert (rows[n:] == T).all()
    # On the multi-program path an expert's rows may come in another order inside its run, so check that each
    # kept assignment appears exactly once, in a block of its own expert's slot, with padding only after it.
    flat = ids.reshape(-1).cpu().long()
    valid = (flat >= 0) & (flat < table.numel())
    want = torch.nonzero(valid).flatten()
    used = rows[:n]
    kept = used[used < T].long()
    assert torch.equal(kept.sort().values, want)
    pos = torch.nonzero(used < T).flatten()
    assert torch.equal(table.cpu()[flat[kept]], got.block_slot.cpu()[pos // bm])
    assert torch.equal(rows.view(-1, bm)[:, 0] < T, ref.sorted_ids.cpu().view(-1, bm)[:, 0] < T)


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("bm", [16, 32])
def test_moe_align_matches_reference(M, bm):
    gen = torch.Generator().manual_seed(M * bm)
    table, have = slot_table(12, 7, gen)
    ids, _ = routing(M, 3, have, gen)
    _check_alignment(ids, table, bm)


def test_moe_align_multi_program_path_and_edge_cases():
    gen = torch.Generator().manual_seed(1)
    table, have = slot_table(40, 33, gen)
    ids, _ = routing(300, 4, have, gen)  # 1200 assignments: the 3-kernel path
    _check_alignment(ids, table, 16)
    one = torch.full((70, 1), int(have[0]), dtype=torch.int32, device=DEV)  # every token on one expert
    _check_alignment(one, table, 16)
    bad = ids[:5].clone()
    bad[0, 0], bad[1, 1] = -3, 40  # ids outside [0, num_ids) are dropped, not read out of bounds
    _check_alignment(bad, table, 16)
    got = moe_align_block_size(bad, table, 16)
    kept = got.sorted_ids[got.sorted_ids < bad.numel()].cpu().tolist()
    assert sorted(kept) == [f for f in range(bad.numel()) if f not in (0, 5)]


# ---- fused MoE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_moe_fused_matches_reference(M, fp8):
    gen = torch.Generator().manual_seed(100 * M + fp8)
    N, K, num_ids, S, k = 128, 256, 10, 6, 3
    w13, w2, s13, s2 = make_weights(S, N, K, fp8, gen.initial_seed())
    table, have = slot_table(num_ids, S, gen)  # 4 ids without a slot; slots permuted
    ids, w = routing(M, k, have, gen)
    x = torch.randn((M, K), generator=gen).to(torch.bfloat16).to(DEV)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128) if fp8 else None)
    out = torch.full((M, K), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: all must be written
    fm.fused_moe(x, w13, w2, ids, w, table, config=SMALL if fp8 else {**SMALL, "BLOCK_SIZE_K": 64}, out=out, **kw)
    ref = fmr.fused_moe_reference(x, w13, w2, ids, w, table, quantize_activations=fp8, **kw)
    assert torch.isfinite(out.float()).all()
    assert rel(out, ref) < 1e-2
    if fp8:  # and close to the unquantised-activation answer, within FP8 activation error
        assert rel(out, fmr.fused_moe_reference(x, w13, w2, ids, w, table, **kw)) < 0.08


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_moe_routes_computes_only_ids_in_the_table(fp8):
    """fused_moe_routes: one output row per route, written only for ids in [0, num_ids) (the expert cache's rounds
    hand over the rest as id num_ids); other rows keep what they held."""
    gen = torch.Generator().manual_seed(11 + fp8)
    N, K, S, k, M = 128, 256, 5, 3, 6
    w13, w2, s13, s2 = make_weights(S, N, K, fp8, gen.initial_seed())
    table = torch.randperm(S, generator=gen).to(torch.int32).to(DEV)
    ids, _ = routing(M, k, torch.arange(S), gen)
    ids[0, 1] = ids[3, 0] = ids[5, 2] = S  # not this round's
    w = torch.rand(M * k, generator=gen).to(DEV)
    x = torch.randn((M, K), generator=gen).to(torch.bfloat16).to(DEV)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128) if fp8 else None)
    out = torch.full((M * k, K), float("nan"), dtype=torch.bfloat16, device=DEV)
    fm.fused_moe_routes(
        x, w13, w2, ids, w, table, out=out, config=SMALL if fp8 else {**SMALL, "BLOCK_SIZE_K": 64}, **kw
    )
    ref = torch.full_like(out, float("nan"))
    fmr.fused_moe_routes_reference(x, w13, w2, ids, w, table, out=ref, quantize_activations=fp8, **kw)
    skipped = (ids.view(-1) == S).cpu()
    assert torch.isnan(out[skipped.to(DEV)].float()).all() and torch.isnan(ref[skipped.to(DEV)].float()).all()
    computed = (~skipped).to(DEV)
    assert torch.isfinite(out[computed].float()).all()
    assert rel(out[computed], ref[computed]) < 1e-2
    # the summed kernel is the routes' weighted sum (each partial row rounded to bf16 first)
    ids_all = torch.where(ids == S, 0, ids)
    summed = fm.fused_moe(
        x, w13, w2, ids_all, w.view(M, k), table, config=SMALL if fp8 else {**SMALL, "BLOCK_SIZE_K": 64}, **kw
    )
    routes = fm.fused_moe_routes(
        x, w13, w2, ids_all, w, table, config=SMALL if fp8 else {**SMALL, "BLOCK_SIZE_K": 64}, **kw
    )
    assert torch.equal(summed, routes.view(M, k, K).float().sum(dim=1).bfloat16())


def test_moe_all_tokens_on_one_expert_and_prequantised_activations(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    N, K, S = 128, 256, 3
    w13, w2, s13, s2 = make_weights(S, N, K, True, gen.initial_seed())
    table = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEV)
    ids = torch.full((20, 1), 1, dtype=torch.int32, device=DEV)  # 20 rows of one expert: two 16-row blocks
    w = torch.rand((20, 1), generator=gen).to(DEV)
    x = torch.randn((20, K), generator=gen).to(torch.bfloat16).to(DEV)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128))
    ref = fmr.fused_moe_reference(x, w13, w2, ids, w, table, quantize_activations=True, **kw)
    in_kernel = fm.fused_moe(x, w13, w2, ids, w, table, config=SMALL, **kw)
    monkeypatch.setattr(fm, "QUANT_IN_KERNEL_MAX_TOKENS", 0)  # the large-batch path: act_quant pass, then FP8 A
    separate = fm.fused_moe(x, w13, w2, ids, w, table, config=SMALL, **kw)
    assert rel(in_kernel, ref) < 1e-2 and rel(separate, ref) < 1e-2


def test_moe_fp8_gate_up_stage_is_tight():
    """The gate-up GEMM alone against torch on identical quantised inputs (no bf16 rounding cascade)."""
    gen = torch.Generator().manual_seed(3)
    N, K = 128, 384
    w13, _, s13, _ = make_weights(2, N, K, True, gen.initial_seed())
    ids = torch.tensor([[1], [0], [1]], dtype=torch.int32, device=DEV)
    table = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    x = torch.randn((3, K), generator=gen).to(torch.bfloat16).to(DEV)
    align = moe_align_block_size(ids, table, 16)
    h = torch.empty((3, N), dtype=torch.bfloat16, device=DEV)
    fm.launch_gate_up(x, w13, s13, h, align, 1, SMALL, True, True, 128)
    xq = dequantize_groups_fp8(*per_token_group_quant_fp8_reference(x))
    from moed.formats.fp8 import dequantize_block_fp8

    for t in range(3):
        wgu = dequantize_block_fp8(w13[int(ids[t, 0])], s13[int(ids[t, 0])], 128, 128)
        g, u = xq[t] @ wgu[:N].T, xq[t] @ wgu[N:].T
        torch.testing.assert_close(
            h[t].float(), (torch.nn.functional.silu(g) * u).bfloat16().float(), rtol=1e-2, atol=1e-3
        )


def test_moe_id_without_slot_adds_nothing():
    gen = torch.Generator().manual_seed(5)
    N, K = 128, 256
    w13, w2, _, _ = make_weights(2, N, K, False, gen.initial_seed())
    table = torch.tensor([1, -1, 0], dtype=torch.int32, device=DEV)
    ids = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=DEV)
    w = torch.rand((2, 2), generator=gen).to(DEV)
    x = torch.randn((2, K), generator=gen).to(torch.bfloat16).to(DEV)
    out = fm.fused_moe(x, w13, w2, ids, w, table, config={**SMALL, "BLOCK_SIZE_K": 64})
    ids_ok = torch.tensor([[0, 0], [2, 0]], dtype=torch.int32, device=DEV)
    w_ok = w.clone()
    w_ok[0, 1] = 0.0
    ref = fmr.fused_moe_reference(x, w13, w2, ids_ok, w_ok, table)
    assert rel(out, ref) < 1e-2


def test_moe_bad_inputs_are_named():
    gen = torch.Generator().manual_seed(0)
    w13, w2, s13, s2 = make_weights(2, 128, 256, True, gen.initial_seed())
    x = torch.zeros((1, 256), dtype=torch.bfloat16, device=DEV)
    ids = torch.zeros((1, 1), dtype=torch.int32, device=DEV)
    w = torch.ones((1, 1), device=DEV)
    table = torch.arange(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="topk_ids"):
        fm.fused_moe(x, w13, w2, ids.long(), w, table, w13_scale=s13, w2_scale=s2, block_shape=(128, 128))
    with pytest.raises(ValueError, match="w13_scale"):
        fm.fused_moe(x, w13, w2, ids, w, table, w2_scale=s2, block_shape=(128, 128))
    with pytest.raises(ValueError, match="BLOCK_SIZE_K"):
        fm.fused_moe(
            x,
            w13,
            w2,
            ids,
            w,
            table,
            w13_scale=s13,
            w2_scale=s2,
            block_shape=(128, 128),
            config={**SMALL, "BLOCK_SIZE_K": 64},
        )
    with pytest.raises(ValueError, match="hidden"):
        fm.fused_moe(x.float(), w13, w2, ids, w, table, w13_scale=s13, w2_scale=s2, block_shape=(128, 128))


def test_moe_config_lookup_used_without_config(caplog):
    gen = torch.Generator().manual_seed(9)
    w13, w2, _, _ = make_weights(2, 64, 128, False, gen.initial_seed())
    table = torch.arange(2, dtype=torch.int32, device=DEV)
    ids = torch.tensor([[0, 1]], dtype=torch.int32, device=DEV)
    w = torch.rand((1, 2), generator=gen).to(DEV)
    x = torch.randn((1, 128), generator=gen).to(torch.bfloat16).to(DEV)
    out = fm.fused_moe(x, w13, w2, ids, w, table)  # no table for E=2, N=64 anywhere: defaults
    assert rel(out, fmr.fused_moe_reference(x, w13, w2, ids, w, table)) < 1e-2


# ---- GPU, GLM-5.1 widths ------------------------------------------------------------------------------------

GLM_K = 6144


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("N,M", [(2048, 1), (2048, 64), (2048, 300), (256, 33)])
def test_moe_gpu_glm_shapes(N, M, fp8):
    gen = torch.Generator().manual_seed(N + M)
    S, num_ids, k = 24, 257, 9
    w13, w2, s13, s2 = make_weights(S, N, GLM_K, fp8, gen.initial_seed(), "cuda")
    table, have = slot_table(num_ids, S, gen)
    ids, w = routing(M, k, have, gen)
    x = torch.randn((M, GLM_K), generator=gen).to(torch.bfloat16).cuda()
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128) if fp8 else None)
    out = fm.fused_moe(x, w13, w2, ids, w, table, **kw)
    ref = fmr.fused_moe_reference(x, w13, w2, ids, w, table, quantize_activations=fp8, **kw)
    assert rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_moe_gpu_graph_capture_without_host_sync():
    gen = torch.Generator().manual_seed(11)
    N, S, k, M = 512, 16, 9, 4
    w13, w2, s13, s2 = make_weights(S, N, GLM_K, True, gen.initial_seed(), "cuda")
    table, have = slot_table(257, S, gen)
    ids, w = routing(M, k, have, gen)
    x = torch.randn((M, GLM_K), generator=gen).to(torch.bfloat16).cuda()
    out = torch.empty_like(x)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128), out=out)
    fm.fused_moe(x, w13, w2, ids, w, table, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fm.fused_moe(x, w13, w2, ids, w, table, **kw)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fm.fused_moe(x, w13, w2, ids, w, table, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids2, w2_ = routing(M, k, have, gen)
    ids.copy_(ids2)
    w.copy_(w2_)
    x.copy_(torch.randn((M, GLM_K), generator=gen).to(torch.bfloat16))
    graph.replay()
    ref = fmr.fused_moe_reference(
        x, w13, w2, ids, w, table, quantize_activations=True, w13_scale=s13, w2_scale=s2, block_shape=(128, 128)
    )
    assert rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_moe_gpu_align_large_batch():
    gen = torch.Generator().manual_seed(12)
    table, have = slot_table(257, 257, gen)
    ids, _ = routing(8192, 9, have, gen)
    for bm in (16, 64, 128):
        _check_alignment(ids, table, bm)
