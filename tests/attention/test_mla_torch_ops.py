"""The attention-side custom ops (`moed::indexer_topk`, `moed::sparse_mla`, `moed::gather_paged_rows`,
`moed::paged_store`).

On the CPU: torch.library.opcheck on paged pools (bf16 and FP8, shuffled pages, sequences crossing pages,
contexts shorter and longer than top-k), the CPU implementation against the torch references on the rows as
written, the kernel's -1 / non-causal index semantics, torch.compile(fullgraph=True) of an indexer -> sparse
MLA -> gather step without a graph break, and Inductor writing a pool view in place through `paged_store`.
`gpu`: the CUDA ops against direct kernel calls, and under Inductor.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from moed.attention.paged_kv import PagedKVPool, PagedSequence, build_paged_step
from moed.kernels import index_k_gather, indexer, torch_ops
from moed.kernels import sparse_mla as mla
from moed.model.attention_interface import PagedStep, SequenceStep
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig

# (num_cached, num_new): a prefill longer than top-k (16), a short prefill, a decode past top-k, a short decode.
STEPS = [(0, 21), (3, 4), (30, 1), (2, 1)]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels themselves run (interpreted on a CPU)
CFG = GlmMoeDsaConfig.from_dict(make_config("tiny"))  # C=64, R=16, 4 heads; indexer D=32, 16 heads; top-k 16


@dataclasses.dataclass
class Step:
    pool: PagedKVPool
    paged: PagedStep
    seqs: list[SequenceStep]
    positions: torch.Tensor  # [tokens] int64
    q_idx: torch.Tensor  # [tokens, index_n_heads, index_head_dim] bf16
    w_idx: torch.Tensor  # [tokens, index_n_heads] fp32
    q_lat: torch.Tensor  # [tokens, H, C] bf16
    q_rope: torch.Tensor  # [tokens, H, R] bf16


def make_step(latent_dtype: str, index_dtype: str, seed: int, device: str = "cpu", page_size: int = 8) -> Step:
    """Layer 0 of a pool with random latents / keys written at every context position; pages shuffled."""
    g = torch.Generator().manual_seed(seed)
    pool = PagedKVPool(CFG, 24, page_size, latent_dtype, index_dtype, device)
    pool._free.clear()
    pool._free.extend((torch.randperm(23, generator=g) + 1).tolist())
    seqs = [SequenceStep(c, n, PagedSequence(pool)) for c, n in STEPS]
    paged = build_paged_step(seqs, page_size, device)
    for s in seqs:
        L = s.context_len
        one = build_paged_step([SequenceStep(0, L, s.kv)], page_size, device)
        pool.store(
            0,
            *(
                torch.randn(L, d, generator=g).to(device)
                for d in (CFG.kv_lora_rank, CFG.qk_rope_head_dim, CFG.index_head_dim)
            ),
            *pool.slots(one, torch.arange(L, device=device)),
        )
    positions = torch.cat([torch.arange(s.num_cached, s.context_len) for s in seqs]).to(device)
    T, H = positions.shape[0], CFG.num_attention_heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16().to(device)

    return Step(
        pool,
        paged,
        seqs,
        positions,
        rand(T, CFG.index_n_heads, CFG.index_head_dim),
        (torch.randn(T, CFG.index_n_heads, generator=g) * CFG.index_n_heads**-0.5).to(device),
        rand(T, H, CFG.kv_lora_rank),
        rand(T, H, CFG.qk_rope_head_dim),
    )


def indexer_args(s: Step) -> tuple:
    iv = s.pool.index_view(0)
    return (
        s.q_idx,
        s.w_idx,
        iv.k,
        iv.scale,
        s.paged.page_table,
        s.paged.query_start,
        s.positions,
        s.paged.max_new,
        s.paged.max_context,
        CFG.index_topk,
    )


def mla_args(s: Step, indices: torch.Tensor | None, config: list[int] | None = None) -> tuple:
    lv = s.pool.latent_view(0)
    return (
        s.q_lat,
        s.q_rope,
        lv.nope,
        lv.rope,
        lv.scale,
        s.paged.page_table,
        s.paged.token_seq,
        s.positions,
        indices,
        CFG.softmax_scale,
        s.paged.max_context,
        config,
    )


def opcheck(op, args: tuple) -> None:
    """torch.library.opcheck; its schema test is left out when an input is FP8: SchemaCheckMode detects mutation
    with torch.allclose, which torch does not implement for float8 (the bf16 cases check the same schema)."""
    fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils if fp8 else ("test_schema", *utils))


def rows_of(s: Step, b: int) -> slice:
    start = sum(x.num_new for x in s.seqs[:b])
    return slice(start, start + s.seqs[b].num_new)


@pytest.mark.parametrize(
    "ours,kernel",
    [
        (torch_ops.indexer_topk, indexer.indexer_topk),
        (torch_ops.sparse_mla, mla.sparse_mla),
        (torch_ops.gather_paged_rows, index_k_gather.gather_paged_rows),
    ],
)
def test_mla_op_functions_keep_the_kernel_signatures(ours, kernel):
    """Each op function takes the kernel function's parameters (same names, kinds, defaults), minus split and out."""
    want = inspect.signature(kernel).parameters
    have = inspect.signature(ours).parameters
    for name, p in have.items():
        assert name in want, f"{ours.__name__}: parameter {name} is not the kernel's"
        assert (p.kind, p.default) == (want[name].kind, want[name].default), name
    dropped = ("num_splits", "out") if ours.__name__ != "gather_paged_rows" else ()
    assert [n for n in want if n not in dropped] == list(have)


# ---- indexer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", ["bf16", "fp8"])
def test_indexer_op_opcheck_and_reference(index_dtype):
    s = make_step("bf16", index_dtype, seed=1)
    args = indexer_args(s)
    opcheck(torch.ops.moed.indexer_topk.default, args)
    topk = torch_ops.indexer_topk(*args)
    assert topk.dtype == torch.int32 and topk.shape == (s.positions.shape[0], CFG.index_topk)
    for b, seq in enumerate(s.seqs):
        keys = s.pool.read_index_k(0, seq.kv.pages, seq.context_len)  # dequantised, as written
        r = rows_of(s, b)
        want = indexer.indexer_topk_reference(s.q_idx[r], s.w_idx[r], keys, s.positions[r], CFG.index_topk)
        assert torch.equal(topk[r], want), b
    valid = topk >= 0  # every row holds min(position + 1, top-k) causal positions, -1 after
    assert torch.equal(valid.sum(1), torch.clamp(s.positions + 1, max=CFG.index_topk))
    assert (torch.where(valid, topk, 0) <= s.positions[:, None]).all()


def test_indexer_op_rejects_positions_past_max_context():
    s = make_step("bf16", "bf16", seed=2)
    args = list(indexer_args(s))
    args[8] = 20  # max_context below the longest context (31)
    with pytest.raises(ValueError, match="max_context is 20"):
        torch_ops.indexer_topk(*args)


# ---- sparse MLA -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_sparse_mla_op_opcheck_and_reference(latent_dtype, dense):
    s = make_step(latent_dtype, "bf16", seed=3)
    s.q_lat = s.q_lat.transpose(0, 1).contiguous().transpose(0, 1)  # [T, H, C] with head-major strides, as nsa's bmm
    topk = None if dense else torch_ops.indexer_topk(*indexer_args(s))
    config = None if dense else torch_ops.mla_config_ints(mla.MLAConfig(block_h=16, block_n=16))
    args = mla_args(s, topk, config)
    opcheck(torch.ops.moed.sparse_mla.default, args)
    out = torch_ops.sparse_mla(*args[:-1], config=mla.MLAConfig(block_h=16, block_n=16) if config else None)
    assert out.dtype == s.q_lat.dtype and out.shape == s.q_lat.shape
    for b, seq in enumerate(s.seqs):
        latent, k_rope = s.pool.read_latent(0, seq.kv.pages, seq.context_len)
        r = rows_of(s, b)
        want = mla.sparse_mla_reference(
            s.q_lat[r], s.q_rope[r], latent, k_rope, s.positions[r], None if dense else topk[r], CFG.softmax_scale
        )
        assert torch.equal(out[r], want.to(out.dtype)), b


def test_sparse_mla_op_skips_unused_and_non_causal_indices_as_the_kernel_does():
    """-1 entries and positions past the token's own are skipped; a token with nothing left gets zeros. The CPU op
    against the Triton kernel (interpreted without a GPU) on such indices."""
    s = make_step("bf16", "bf16", seed=4)
    T, k = s.positions.shape[0], 8
    g = torch.Generator().manual_seed(5)
    indices = torch.stack([torch.randperm(40, generator=g)[:k] for _ in range(T)]).to(torch.int32)  # some > pos
    indices[:, -2:] = -1
    indices[0] = -1  # nothing selected
    out = torch_ops.sparse_mla(*mla_args(s, indices)[:-1])
    on_dev = make_step("bf16", "bf16", seed=4, device=DEV)  # the same step where the kernel runs
    kernel = mla.sparse_mla(*mla_args(on_dev, indices.to(DEV))[:-1], config=mla.MLAConfig(block_h=16, block_n=16))
    kernel = kernel.cpu()
    assert not out[0].any() and not kernel[0].any()
    assert float((out.float() - kernel.float()).norm() / kernel.float().norm()) < 1e-2
    b, r = 1, rows_of(s, 1)
    latent, k_rope = s.pool.read_latent(0, s.seqs[b].kv.pages, s.seqs[b].context_len)
    causal = torch.where((indices[r] >= 0) & (indices[r] <= s.positions[r, None]), indices[r], -1)
    want = mla.sparse_mla_reference(s.q_lat[r], s.q_rope[r], latent, k_rope, s.positions[r], causal, CFG.softmax_scale)
    assert torch.equal(out[r], torch.nan_to_num(want, nan=0.0).to(out.dtype))  # (the reference: NaN if nothing)


def test_sparse_mla_op_rejects_a_bad_config():
    s = make_step("bf16", "bf16", seed=6)
    with pytest.raises(ValueError, match="config has 2 values"):
        torch.ops.moed.sparse_mla(*mla_args(s, None, [16, 16]))


# ---- paged-row gather -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype,out_dtype", [("bf16", torch.bfloat16), ("fp8", torch.float32)])
def test_sparse_gather_op_opcheck_and_reference(index_dtype, out_dtype):
    s = make_step("bf16", index_dtype, seed=7)
    iv = s.pool.index_view(0)
    lens = s.paged.seq_lens
    start = (torch.cumsum(lens, 0) - lens).to(torch.int32)
    rows = int(lens.sum()) + 3  # rows past the sequences stay as they were
    out = torch.full((rows, CFG.index_head_dim), 7.0, dtype=out_dtype)
    args = (iv.k, iv.scale, s.paged.page_table, lens, start, s.paged.max_context, out)
    opcheck(torch.ops.moed.gather_paged_rows.default, args)
    got = torch_ops.gather_paged_rows(*args)
    assert got is out
    want = index_k_gather.gather_paged_rows_reference(
        iv.k, iv.scale, s.paged.page_table, lens, start, torch.full_like(out, 7.0)
    )
    assert torch.equal(out, want) and (out[-3:] == 7.0).all()
    b = 2
    assert torch.equal(
        out[int(start[b]) : int(start[b] + lens[b])],
        s.pool.read_index_k(0, s.seqs[b].kv.pages, s.seqs[b].context_len).to(out_dtype),
    )


# ---- tracing --------------------------------------------------------------------------------------------------


def _attention_step(
    q_idx,
    w_idx,
    q_lat,
    q_rope,
    positions,
    k,
    k_scale,
    nope,
    rope,
    scale,
    page_table,
    query_start,
    token_seq,
    seq_lens,
    max_new: int,
    max_context: int,
) -> torch.Tensor:
    """Indexer -> sparse MLA, and the dense path's latent gather, with torch ops around them."""
    topk = torch_ops.indexer_topk(
        q_idx, w_idx * 2.0, k, k_scale, page_table, query_start, positions, max_new, max_context, CFG.index_topk
    )
    o = torch_ops.sparse_mla(
        q_lat, q_rope, nope, rope, scale, page_table, token_seq, positions, topk, CFG.softmax_scale, max_context
    )
    start = (torch.cumsum(seq_lens, 0) - seq_lens).to(torch.int32)
    gathered = torch.zeros(
        positions.shape[0] + max_context * page_table.shape[0], nope.shape[2], dtype=o.dtype, device=o.device
    )
    torch_ops.gather_paged_rows(nope, scale, page_table, seq_lens, start, max_context, gathered)
    return o.float().sum(dim=1) + gathered[: positions.shape[0]].float()


def _attention_inputs(s: Step) -> tuple:
    iv, lv = s.pool.index_view(0), s.pool.latent_view(0)
    return (
        s.q_idx,
        s.w_idx,
        s.q_lat,
        s.q_rope,
        s.positions,
        iv.k,
        iv.scale,
        lv.nope,
        lv.rope,
        lv.scale,
        s.paged.page_table,
        s.paged.query_start,
        s.paged.token_seq,
        s.paged.seq_lens,
        s.paged.max_new,
        s.paged.max_context,
    )


@pytest.mark.parametrize("dynamic", [False, True])
def test_mla_ops_compile_fullgraph_without_graph_breaks(dynamic):
    s = make_step("fp8", "fp8", seed=8)
    inputs = _attention_inputs(s)
    explained = torch._dynamo.explain(_attention_step)(*inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    called = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"moed.indexer_topk", "moed.sparse_mla", "moed.gather_paged_rows"} <= {
        c.split(".default")[0] for c in called
    }, called
    torch._dynamo.reset()
    compiled = torch.compile(_attention_step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    assert torch.equal(compiled(*inputs), _attention_step(*inputs))


# ---- GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("latent_dtype,index_dtype", [("bf16", "fp8"), ("fp8", "bf16")])
def test_mla_gpu_ops_equal_direct_kernel_calls(latent_dtype, index_dtype):
    s = make_step(latent_dtype, index_dtype, seed=9, device="cuda")
    args = indexer_args(s)
    topk = torch_ops.indexer_topk(*args)
    assert torch.equal(topk, indexer.indexer_topk(*args))
    for indices in (topk, None):
        margs = mla_args(s, indices)[:-1]
        assert torch.equal(torch_ops.sparse_mla(*margs), mla.sparse_mla(*margs))
    lv = s.pool.latent_view(0)
    lens = s.paged.seq_lens
    start = (torch.cumsum(lens, 0) - lens).to(torch.int32)
    got, want = (torch.zeros(int(lens.sum()), CFG.kv_lora_rank, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    gargs = (lv.nope, lv.scale, s.paged.page_table, lens, start, s.paged.max_context)
    assert torch.equal(torch_ops.gather_paged_rows(*gargs, got), index_k_gather.gather_paged_rows(*gargs, want))
    opcheck(torch.ops.moed.sparse_mla.default, mla_args(s, topk))


@pytest.mark.gpu
def test_mla_gpu_ops_under_inductor():
    s = make_step("bf16", "fp8", seed=10, device="cuda")
    inputs = _attention_inputs(s)
    want = _attention_step(*inputs)
    # The ops' results are the same tensors; Inductor may sum the heads in another order.
    torch.testing.assert_close(torch.compile(_attention_step, fullgraph=True)(*inputs), want, rtol=1e-5, atol=1e-5)


# ---- paged KV write -------------------------------------------------------------------------------------------


def _write_then_read(
    pool_u8: torch.Tensor, rows: torch.Tensor, page: torch.Tensor, offset: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Write FP8 rows into one layer of a uint8 pool through the op, then use some of them (as attention would)."""
    layer = pool_u8[1, :, :, :32]  # a strided view of the pool, as PagedKVPool's latent views are
    torch_ops.paged_store(layer, rows.view(torch.uint8), page, offset)
    return q @ layer[page[:4], offset[:4]].view(torch.float8_e4m3fn).float().T


def test_sparse_paged_store_op_writes_in_place_and_inductor_keeps_it_in_place():
    g = torch.Generator().manual_seed(11)
    pool = torch.zeros(2, 40, 8, 48, dtype=torch.uint8)  # [layers, pages, page, row bytes]
    rows = torch.randn(6, 32, generator=g).to(torch.float8_e4m3fn)
    page, offset = torch.tensor([3, 3, 9, 1, 30, 2]), torch.tensor([0, 7, 2, 5, 1, 1])
    opcheck(torch.ops.moed.paged_store.default, (pool[1, :, :, :32], rows.view(torch.uint8), page, offset))
    want = pool.clone()
    want[1, :, :, :32][page, offset] = rows.view(torch.uint8)
    q = torch.randn(3, 32, generator=g)
    expect = _write_then_read(want.clone(), rows, page, offset, q)
    got = pool.clone()
    torch._dynamo.reset()
    out, (code, *_) = torch._inductor.utils.run_and_get_code(
        torch.compile(_write_then_read, fullgraph=True), got, rows, page, offset, q
    )
    assert torch.equal(got, want) and torch.equal(out, expect)
    # Written in place: no buffer the size of the pool layer (40 x 8 x 32) is allocated to scatter into and copy back.
    # (Written as `layer[page, offset] = rows`, torch 2.13's Inductor allocates that buffer and copies it back.)
    assert re.search(r"moed\.paged_store\.default\(reinterpret_tensor\(arg0_1, \(40, 8, 32\)", code), code
    assert not re.search(r"empty_strided_\w+\(\(40, 8, 32\)", code), code
    with pytest.raises(ValueError, match="paged_store"):
        torch_ops.paged_store(pool[1], rows.view(torch.uint8), page, offset)  # rows of 32 bytes, pool rows of 48
