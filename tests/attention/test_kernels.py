"""DSA kernels vs their torch references on fresh random inputs (the CPU runs them in the Triton interpreter).

Batches mix decode tokens and prefill chunks, contexts shorter and longer than top-k, sequences that cross
page boundaries (page sizes 4-16, pages handed out in shuffled order), FP8 / bf16 / fp32 pools, and head
counts below the kernel's head tile (padded heads).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moed.attention.paged_kv import PagedKVPool, PagedSequence, build_paged_step
from moed.attention.trtllm import decode_args, emulate_decode, pad_heads, physical_slots
from moed.kernels.index_k_gather import gather_paged_rows, gather_paged_rows_reference
from moed.kernels.indexer import ScoresConfig, indexer_scores, indexer_scores_reference, indexer_topk, topk_from_scores
from moed.kernels.sparse_mla import MLAConfig, sparse_mla, sparse_mla_reference
from moed.model.attention_interface import PagedStep, SequenceStep
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled kernels where there is a GPU

# (num_cached, num_new): decode past top-k, a short prefill, a prefill crossing top-k, MTP-like, a short decode.
MIXED = [(45, 1), (0, 11), (9, 14), (60, 3), (5, 1)]


def small_config(**overrides) -> GlmMoeDsaConfig:
    """The tiny preset's attention dims: C=64, R=16, index D=32 with 16 heads, 4 heads, top-k 16."""
    raw = make_config("tiny")
    raw.update(overrides)
    return GlmMoeDsaConfig.from_dict(raw)


@dataclasses.dataclass
class Filled:
    pool: PagedKVPool
    paged: PagedStep
    seqs: list[SequenceStep]
    positions: torch.Tensor  # [tokens]: positions of the step's new tokens
    latent: list[torch.Tensor]  # per sequence [context, C] as written (before quantisation)
    k_rope: list[torch.Tensor]
    index_k: list[torch.Tensor]


def fill(
    cfg: GlmMoeDsaConfig,
    steps: list[tuple[int, int]],
    page_size: int,
    latent_dtype: str,
    index_dtype: str,
    seed: int,
    num_pages: int = 96,
) -> Filled:
    """Random latents / keys at every context position of each (num_cached, num_new) sequence, layer 0."""
    g = torch.Generator().manual_seed(seed)
    pool = PagedKVPool(cfg, num_pages, page_size, latent_dtype, index_dtype, DEV)
    pool._free.clear()
    pool._free.extend((torch.randperm(num_pages - 1, generator=g) + 1).tolist())  # non-monotone page tables
    seqs = [SequenceStep(c, n, PagedSequence(pool)) for c, n in steps]
    paged = build_paged_step(seqs, page_size, DEV)
    lat, rope, ik = [], [], []
    for s in seqs:
        L = s.context_len
        lat.append(torch.randn(L, cfg.kv_lora_rank, generator=g).to(DEV))
        rope.append(torch.randn(L, cfg.qk_rope_head_dim, generator=g).to(DEV))
        ik.append(torch.randn(L, cfg.index_head_dim, generator=g).to(DEV))
        one = build_paged_step([SequenceStep(0, L, s.kv)], page_size, DEV)
        pool.store(0, lat[-1], rope[-1], ik[-1], *pool.slots(one, torch.arange(L, device=DEV)))
    positions = torch.cat([torch.arange(s.num_cached, s.context_len) for s in seqs]).to(DEV)
    return Filled(pool, paged, seqs, positions, lat, rope, ik)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _sorted(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x.long(), dim=-1).values


@pytest.mark.parametrize(
    "index_dtype,page_size,block_n", [("fp8", 8, 64), ("bf16", 4, 64), ("fp32", 16, 64), ("fp8", 16, 16)]
)
def test_indexer_scores_and_topk_match_reference(index_dtype, page_size, block_n):
    cfg = small_config()
    f = fill(cfg, MIXED, page_size, "bf16", index_dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    T, HI, D = f.positions.shape[0], cfg.index_n_heads, cfg.index_head_dim
    qdt = torch.float32 if index_dtype == "fp32" else torch.bfloat16
    q = torch.randn(T, HI, D, generator=g).to(device=DEV, dtype=qdt)
    w = (torch.randn(T, HI, generator=g) * HI**-0.5).to(DEV)
    iv = f.pool.index_view(0)
    max_ctx, max_new = f.paged.max_context, f.paged.max_new
    scores = torch.full((T, max_ctx + 16), float("nan"), device=DEV)
    indexer_scores(
        q,
        w,
        iv.k,
        iv.scale,
        f.paged.page_table,
        f.paged.query_start,
        f.positions,
        max_new,
        max_ctx,
        scores,
        config=ScoresConfig(block_n=block_n),
    )  # block_n <= page: one page-table read per tile
    topk = indexer_topk(
        q, w, iv.k, iv.scale, f.paged.page_table, f.paged.query_start, f.positions, max_new, max_ctx, cfg.index_topk
    )
    t = 0
    for b, s in enumerate(f.seqs):
        keys = f.pool.read_index_k(0, s.kv.pages, s.context_len)  # dequantised, as the kernel sees them
        rows = slice(t, t + s.num_new)
        ref = indexer_scores_reference(q[rows], w[rows], keys)
        for i in range(s.num_new):
            p = s.num_cached + i
            assert torch.allclose(scores[t + i, : p + 1], ref[i, : p + 1], rtol=1e-4, atol=1e-5), (b, i)
            want = torch.topk(ref[i, : p + 1], min(cfg.index_topk, p + 1)).indices
            got = topk[t + i]
            assert (got[got >= 0].shape[0]) == want.shape[0] and (got[want.shape[0] :] == -1).all()
            assert torch.equal(_sorted(got[got >= 0]), _sorted(want)), (b, i)
        t += s.num_new


@pytest.mark.parametrize("chunks", [None, 1, 5])
def test_topk_from_scores_ties_zeros_and_long_rows(chunks):
    """Exact ties at the threshold, +-0.0, negatives, rows of exactly k and k + 1 positions, and rows longer than
    one kernel block (1024), split over several programs per row or not: the same selection every way."""
    g = torch.Generator().manual_seed(3)
    K, width = 64, 6000
    rows = [
        torch.randn(width, generator=g),  # plain
        torch.where(torch.rand(width, generator=g) < 0.5, 1.0, torch.randn(width, generator=g) - 5),  # many ties
        torch.cat([torch.zeros(width // 2), -torch.zeros(width - width // 2)]),  # all (+-)zero
        -torch.rand(width, generator=g) * 1e-30,  # tiny negatives
        torch.randn(width, generator=g).round(decimals=1),  # ties in the low bits only
        torch.randn(width, generator=g),
        torch.randn(width, generator=g),
    ]
    scores = torch.stack(rows).to(DEV)
    positions = torch.tensor([width - 1, 4999, width - 1, 700, 3000, K - 1, K], device=DEV)
    buf = torch.full((len(rows), K + 8), -7, dtype=torch.int32, device=DEV)
    out = buf[:, :K]  # strided rows: a write past slot K would land in the guard columns
    topk_from_scores(
        scores, positions, K, out, torch.empty(len(rows), width, dtype=torch.int32, device=DEV), chunks=chunks
    )
    assert (buf[:, K:] == -7).all()
    for r in range(len(rows)):
        n = int(positions[r]) + 1
        row, got = scores[r, :n], out[r].long()
        if n <= K:
            assert torch.equal(got[:n], torch.arange(n, device=DEV)) and (got[n:] == -1).all()
            continue
        assert (got >= 0).all() and got.unique().numel() == K and (got < n).all()
        kth = torch.topk(row, K).values[-1]
        assert (row[got] >= kth).all()  # every pick is at least the k-th value
        assert (row > kth).sum() <= K and set(torch.where(row > kth)[0].tolist()) <= set(got.tolist())
        tied = torch.where(row == kth)[0]  # ties at the threshold go to the lowest positions
        assert torch.equal(_sorted(got[row[got] == kth]), tied[: int((row[got] == kth).sum())])
        if r == 2:  # +0.0 and -0.0 are one value
            assert torch.equal(_sorted(got), torch.arange(K, device=DEV))
    # Output order does not depend on the split (no order comes from atomics).
    again = torch.empty_like(out)
    topk_from_scores(
        scores, positions, K, again, torch.empty(len(rows), width, dtype=torch.int32, device=DEV), chunks=3
    )
    assert torch.equal(again, out)


@pytest.mark.parametrize(
    "latent_dtype,heads,splits,page_size,swap",
    [
        ("fp32", 4, 1, 8, False),
        ("bf16", 8, 3, 4, False),
        ("fp8", 4, 2, 16, False),
        ("bf16", 20, 1, 8, False),
        ("bf16", 8, 2, 8, True),
        ("fp8", 20, 1, 4, True),
        ("fp32", 4, 3, 16, True),
    ],
)
def test_sparse_mla_matches_reference(latent_dtype, heads, splits, page_size, swap):
    cfg = small_config()
    f = fill(cfg, MIXED, page_size, latent_dtype, "fp8", seed=21)
    g = torch.Generator().manual_seed(22)
    T, C, R, K = f.positions.shape[0], cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_topk
    dt = torch.float32 if latent_dtype == "fp32" else torch.bfloat16
    q_lat = torch.randn(T, heads, C, generator=g).to(device=DEV, dtype=dt)
    q_rope = torch.randn(T, heads, R, generator=g).to(device=DEV, dtype=dt)
    # A selection per token: random causal positions, some slots unused (-1), and in prefill rows one
    # position after the token's own, which must be ignored (the reference masks it as non-causal).
    idx = torch.full((T, K), -1, dtype=torch.int32)
    last = torch.cat([torch.full((s.num_new,), s.context_len - 1) for s in f.seqs])
    for t, p in enumerate(f.positions.tolist()):
        n = min(p + 1, K) - (t % 3 == 0 and p > 2)
        idx[t, :n] = torch.randperm(p + 1, generator=g)[:n].to(torch.int32)
        if p < last[t] and n < K:
            idx[t, n] = p + 1
    idx = idx.to(DEV)
    lv = f.pool.latent_view(0)
    scale = 0.3
    for dense in (False, True):
        out = torch.full((T, heads, C), float("nan"), dtype=dt, device=DEV)
        sparse_mla(
            q_lat,
            q_rope,
            lv.nope,
            lv.rope,
            lv.scale,
            f.paged.page_table,
            f.paged.token_seq,
            f.positions,
            None if dense else idx,
            scale,
            max_context=f.paged.max_context,
            num_splits=splits,
            out=out,
            config=MLAConfig(16, 16, 4, 2, swap=True) if swap else None,
        )  # swap: scores^T in the kernel
        t = 0
        for s in f.seqs:
            lat, kr = f.pool.read_latent(0, s.kv.pages, s.context_len)
            rows = slice(t, t + s.num_new)
            ref = sparse_mla_reference(
                q_lat[rows], q_rope[rows], lat, kr, f.positions[rows], None if dense else idx[rows], scale
            )
            tol = 1e-5 if latent_dtype == "fp32" else 2e-2
            assert _rel(out[rows], ref) < tol, (latent_dtype, dense, s)
            t += s.num_new


def test_gather_paged_rows_matches_reference_over_batch_shapes():
    cfg = small_config()
    for seed, steps in enumerate([[(0, 30)], [(7, 1), (40, 2), (0, 3)], MIXED]):
        for dtype in ("fp8", "bf16"):
            f = fill(cfg, steps, 8, "bf16", dtype, seed=seed)
            iv = f.pool.index_view(0)
            total = int(f.paged.seq_lens.sum())
            start = (torch.cumsum(f.paged.seq_lens, 0) - f.paged.seq_lens).to(torch.int32)
            got = torch.full((total, cfg.index_head_dim), float("nan"), device=DEV)
            want = torch.full_like(got, float("nan"))
            gather_paged_rows(iv.k, iv.scale, f.paged.page_table, f.paged.seq_lens, start, f.paged.max_context, got)
            gather_paged_rows_reference(iv.k, iv.scale, f.paged.page_table, f.paged.seq_lens, start, want)
            assert torch.equal(got, want)
            exact = torch.cat(f.index_k)
            assert _rel(got, exact) < (0.05 if dtype == "fp8" else 4e-3)


def test_trtllm_decode_argument_layout():
    """The flashinfer trtllm-gen decode arguments, read back by a torch emulation, give the sparse MLA result."""
    cfg = small_config()
    steps = [(45, 1), (3, 1), (70, 1)]
    f = fill(cfg, steps, 16, "bf16", "fp8", seed=31)
    g = torch.Generator().manual_seed(32)
    B, H, C, R, K = len(steps), cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_topk
    q_lat = torch.randn(B, H, C, generator=g).bfloat16().to(DEV)
    q_rope = torch.randn(B, H, R, generator=g).bfloat16().to(DEV)
    idx = torch.full((B, K), -1, dtype=torch.int32)
    for b, p in enumerate(f.positions.tolist()):
        n = min(p + 1, K)
        idx[b, :n] = torch.randperm(p + 1, generator=g)[:n].to(torch.int32)
    idx = idx.to(DEV)
    kv_cache = f.pool.latent[0]
    for topk in (idx, None):
        args = decode_args(cfg, q_lat, q_rope, kv_cache, f.paged, topk, f.paged.token_seq, torch.zeros(16, device=DEV))
        assert args["query"].shape == (B, 1, 128, C + R) and args["query"].dtype == torch.bfloat16
        assert (args["query"][:, :, H:] == 0).all()
        if topk is not None:
            assert args["block_tables"].shape == (B, 1, K) and args["sparse_mla_top_k"] == K
        else:
            assert args["block_tables"].shape[1] % (128 // 16) == 0 and args["sparse_mla_top_k"] == 0
        emulated = emulate_decode(args)[:, 0, :H]
        for b, s in enumerate(f.seqs):
            lat, kr = f.pool.read_latent(0, s.kv.pages, s.context_len)
            ref = sparse_mla_reference(
                q_lat[b : b + 1],
                q_rope[b : b + 1],
                lat,
                kr,
                f.positions[b : b + 1],
                None if topk is None else idx[b : b + 1],
                cfg.softmax_scale,
            )
            assert _rel(emulated[b : b + 1], ref) < 1e-5


def test_trtllm_physical_slots_and_head_padding():
    table = torch.tensor([[5, 2, 9], [1, 7, 3]], dtype=torch.int32)
    topk = torch.tensor([[0, 17, 33, -1], [40, 8, -1, -1]], dtype=torch.int32)
    got = physical_slots(topk, table, torch.tensor([0, 1], dtype=torch.int32), 16)
    assert got.tolist() == [[5 * 16, 2 * 16 + 1, 9 * 16 + 1, -1], [3 * 16 + 8, 1 * 16 + 8, -1, -1]]
    x = torch.randn(3, 8, 5)
    padded = pad_heads(x)
    assert padded.shape == (3, 128, 5) and torch.equal(padded[:, :8], x) and (padded[:, 8:] == 0).all()


# A verify step of 8 sequences, 2 tokens each (MTP), as a decode graph replays it: contexts on both sides of top-k,
# one padded row (0 cached, its tokens at 0..1 on the scratch page 0).
VERIFY = [(3, 2), (14, 2), (15, 2), (30, 2), (7, 2), (62, 2), (1, 2), (0, 2)]


@pytest.mark.parametrize("bound", [0, 96])
def test_verify_step_selection_under_a_captured_context_bound(bound):
    """The selection path (indexer top-k, then sparse MLA) on a verify-shaped step, with `max_context` and the page
    table's width the step's own (bound 0) or a larger bound fixed at capture (a graph's host ints), gives what the
    references give for each token's causal context: a graph replay and an eager step read the same positions."""
    cfg = small_config()
    page_size = 4
    f = fill(cfg, VERIFY[:-1], page_size, "bf16", "fp8", seed=31)
    seqs, table = f.seqs, f.paged.page_table
    max_ctx = f.paged.max_context if bound == 0 else bound
    table = torch.nn.functional.pad(table, (0, -(-max_ctx // page_size) - table.shape[1]))  # unused columns: page 0
    table = torch.cat([table, torch.zeros(1, table.shape[1], dtype=torch.int32, device=DEV)])  # the padded row
    lens = torch.tensor([s.context_len for s in seqs] + [2], dtype=torch.int32, device=DEV)
    query_start = torch.arange(len(VERIFY) + 1, dtype=torch.int32, device=DEV) * 2
    token_seq = torch.arange(len(VERIFY), dtype=torch.int32, device=DEV).repeat_interleave(2)
    positions = torch.cat([f.positions, torch.arange(2, device=DEV)])
    g = torch.Generator().manual_seed(32)
    T, HI, D, H, C, R = positions.shape[0], cfg.index_n_heads, cfg.index_head_dim, 4, cfg.kv_lora_rank, 16
    q = torch.randn(T, HI, D, generator=g).to(device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(T, HI, generator=g) * HI**-0.5).to(DEV)
    iv, lv = f.pool.index_view(0), f.pool.latent_view(0)
    topk = indexer_topk(q, w, iv.k, iv.scale, table, query_start, positions, 2, max_ctx, cfg.index_topk)
    q_lat = torch.randn(T, H, C, generator=g).to(device=DEV, dtype=torch.bfloat16)
    q_rope = torch.randn(T, H, R, generator=g).to(device=DEV, dtype=torch.bfloat16)
    out = sparse_mla(
        q_lat, q_rope, lv.nope, lv.rope, lv.scale, table, token_seq, positions, topk, 0.3, max_context=max_ctx
    )
    assert torch.isfinite(out[: T - 2].float()).all()
    assert int(lens.max()) <= max_ctx
    t = 0
    for s in seqs:
        keys = f.pool.read_index_k(0, s.kv.pages, s.context_len)
        rows = slice(t, t + 2)
        ref = indexer_scores_reference(q[rows], w[rows], keys)
        lat, kr = f.pool.read_latent(0, s.kv.pages, s.context_len)
        for i in range(2):
            p = s.num_cached + i
            want = torch.topk(ref[i, : p + 1], min(cfg.index_topk, p + 1)).indices
            got = topk[t + i]
            assert torch.equal(_sorted(got[got >= 0]), _sorted(want)) and (got[want.shape[0] :] == -1).all(), (s, i)
        want_out = sparse_mla_reference(q_lat[rows], q_rope[rows], lat, kr, positions[rows], topk[rows], 0.3)
        assert _rel(out[rows], want_out) < 2e-2, s
        t += 2
