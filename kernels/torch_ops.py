"""moed's kernels as torch.library custom ops (`torch.ops.moed.*`), so torch.compile and graph capture see them.

Dynamo cannot trace the kernel wrappers (host-side launch logic, cached device queries, tuned-table lookups),
and would break the graph at each one. Registered as custom ops, every kernel is one opaque node: the CUDA
implementation calls the Triton wrapper, the CPU implementation calls the plain-torch reference beside it
(so the ops run and are tested on a machine without a GPU), and a fake implementation gives exact output
shapes, dtypes and strides from metadata alone, which is all tracing needs.

Ops (full schemas in `SCHEMAS`):
- `moed::act_quant_fp8(x, group_size) -> (q, scale)`: per-token-group FP8 activation quant (`act_quant`);
- `moed::fused_moe(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale?, w2_scale?,
  block_shape?) -> out`: routed experts addressed through the slot table, tile configs from the tuned tables;
- `moed::indexer_topk(q, weights, k, k_scale?, page_table, query_start, positions, max_new, max_context, topk)
  -> topk_idx`: DSA indexer scores and top-k over the paged index-K pool;
- `moed::sparse_mla(q_lat, q_rope, nope, rope, scale?, page_table, token_seq, positions, indices?, softmax_scale,
  max_context, config?) -> o_lat`: absorbed MLA over selected (or, indices None, all causal) positions;
- `moed::gather_paged_rows(src, scale?, page_table, seq_lens, out_start, max_len, out!)`: paged rows into a
  ragged contiguous buffer (`index_k_gather`), written into `out`;
- `moed::fp8_linear(x, weight, scale, block) -> y`: a block-scaled FP8 projection, w8a16 kernel for decode-sized
  bf16 steps on a GPU, dequantised GEMM otherwise (`fp8_linear`; the one implementation for every device);
- `moed::paged_store(pool!, rows, page, offset)`: `pool[page, offset] = rows` in place (plain torch, every device).
  Not a Triton kernel, but the KV write a forward makes: written as indexing on a pool view, functionalization
  turns it into a scatter into a copy of the whole pool layer, which Inductor materialises every step (torch
  2.13's generated CPU code); as one op that mutates its (view) argument, Inductor calls it in place.

Buffers are the kernels' own (layouts in their modules); no op keeps state. `gather_paged_rows` (`out`) and
`paged_store` (`pool`) mutate a declared argument; the others return fresh tensors.
No output size depends on tensor data:
- `indexer_topk` always returns [tokens, topk] int32, -1 padding rows whose causal prefix is shorter than topk;
- `fused_moe` sizes its sort/alignment buffers for the worst case inside the op (`moe_align`);
- `gather_paged_rows` writes into a caller-sized `out` (rows >= sum of seq_lens, a host bound);
- host ints that size grids (`max_new`, `max_context`, `max_len`) are SymInt in the schemas, so a graph compiled
  with dynamic shapes may pass them through symbolically instead of specialising on each step's value.
Kernel tuning that is not a tensor travels as ints: `block_shape` (bn, bk); `config` the `MLAConfig` fields in
order (`mla_config_ints`). Ops are for inference: no autograd formula (backward through them raises).

Registration happens once per process: a re-import (or importlib.reload) finds `torch.ops.moed.<name>` already
defined and leaves it as it is. The functions at the bottom take the same arguments as the kernel functions
they replace, so a caller switches by changing its import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from moed.kernels import act_quant, index_k_gather, indexer
from moed.kernels import fp8_linear as f8l
from moed.kernels import fused_moe as fm
from moed.kernels import fused_moe_reference as fmr
from moed.kernels import sparse_mla as mla

NAMESPACE = "moed"

SCHEMAS = {
    "act_quant_fp8": "(Tensor x, int group_size) -> (Tensor, Tensor)",
    "fp8_linear": "(Tensor x, Tensor weight, Tensor scale, int[] block) -> Tensor",
    "fused_moe": "(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, "
    "Tensor expert_to_slot, Tensor? w13_scale, Tensor? w2_scale, int[]? block_shape) -> Tensor",
    "indexer_topk": "(Tensor q, Tensor weights, Tensor k, Tensor? k_scale, Tensor page_table, Tensor query_start, "
    "Tensor positions, SymInt max_new, SymInt max_context, int topk) -> Tensor",
    "sparse_mla": "(Tensor q_lat, Tensor q_rope, Tensor nope, Tensor rope, Tensor? scale, Tensor page_table, "
    "Tensor token_seq, Tensor positions, Tensor? indices, float softmax_scale, SymInt max_context, "
    "int[]? config) -> Tensor",
    "gather_paged_rows": "(Tensor src, Tensor? scale, Tensor page_table, Tensor seq_lens, Tensor out_start, "
    "SymInt max_len, Tensor(a!) out) -> ()",
    "paged_store": "(Tensor(a!) pool, Tensor rows, Tensor page, Tensor offset) -> ()",
}
MUTATES = {"gather_paged_rows": ("out",), "paged_store": ("pool",)}


def is_registered(name: str) -> bool:
    """True when `torch.ops.moed.<name>` exists in this process."""
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register(name: str, cuda: Callable, cpu: Callable | None, fake: Callable) -> None:
    """cuda: the CUDA implementation, or with cpu None the one implementation for every device."""
    if is_registered(name):
        return  # an earlier import registered it; a second definition would replace live kernels
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}",
        cuda,
        mutates_args=MUTATES.get(name, ()),
        device_types=None if cpu is None else "cuda",
        schema=SCHEMAS[name],
    )
    if cpu is not None:
        op.register_kernel("cpu")(cpu)
    op.register_fake(fake)


def _pair(block_shape: Sequence[int] | None) -> tuple[int, int] | None:
    return None if block_shape is None else (int(block_shape[0]), int(block_shape[1]))


# -- activation quant -----------------------------------------------------------------------------------------


def _act_quant_check(x: torch.Tensor, group_size: int) -> None:
    # The kernel wrapper's own checks, here so CPU calls and tracing reject the same inputs.
    act_quant.check_group_quant_input(x, group_size, "act_quant_fp8")


def _act_quant_cuda(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return act_quant.per_token_group_quant_fp8(x, group_size)


def _act_quant_cpu(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _act_quant_check(x, group_size)
    return act_quant.per_token_group_quant_fp8_reference(x, group_size)


def _act_quant_fake(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _act_quant_check(x, group_size)
    M, K = x.shape
    return (
        x.new_empty((M, K), dtype=torch.float8_e4m3fn),
        x.new_empty((M, (K + group_size - 1) // group_size), dtype=torch.float32),
    )


# -- fused MoE ------------------------------------------------------------------------------------------------


def _fused_moe_cuda(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, block_shape):
    return fm.fused_moe(
        hidden,
        w13,
        w2,
        topk_ids,
        topk_weights,
        expert_to_slot,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
        block_shape=_pair(block_shape),
    )


def _fused_moe_cpu(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, block_shape):
    block = _pair(block_shape)
    fp8 = fm._check(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, block, None)
    # The kernel computes nothing for an id outside the table or without a slot; the reference rejects such ids,
    # so they are pointed at a served expert with weight 0 (their contribution, exactly zero).
    ids = topk_ids.long()
    num_ids = expert_to_slot.numel()
    slot = torch.full_like(ids, -1)
    in_table = (ids >= 0) & (ids < num_ids)
    slot[in_table] = expert_to_slot[ids[in_table]].long()
    served = slot >= 0
    if not bool(served.any()):
        return hidden.new_zeros(hidden.shape)
    stand_in = ids[served][0]
    ids = torch.where(served, ids, stand_in).to(torch.int32)
    weights = torch.where(served, topk_weights, torch.zeros_like(topk_weights))
    return fmr.fused_moe_reference(
        hidden,
        w13,
        w2,
        ids,
        weights,
        expert_to_slot,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
        block_shape=block,
        quantize_activations=fp8,
    )


def _fused_moe_fake(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, block_shape):
    fm._check(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, _pair(block_shape), None)
    return hidden.new_empty(hidden.shape)


# -- DSA indexer: scores + top-k ------------------------------------------------------------------------------


def _indexer_cuda(q, weights, k, k_scale, page_table, query_start, positions, max_new, max_context, topk):
    return indexer.indexer_topk(q, weights, k, k_scale, page_table, query_start, positions, max_new, max_context, topk)


def _paged_rows(pool: torch.Tensor, scale: torch.Tensor | None, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Rows [0, length) of one sequence from a pool view [pages, page, D], dequantised to fp32 [length, D]."""
    pos = torch.arange(length, device=pool.device)
    page = pages[pos // pool.shape[1]].long()
    rows = pool[page, pos % pool.shape[1]].float()
    return rows * scale[page, pos % pool.shape[1]][:, None] if scale is not None else rows


def _indexer_cpu(q, weights, k, k_scale, page_table, query_start, positions, max_new, max_context, topk):
    indexer._check(q, weights, k, page_table)
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    starts = query_start.tolist()
    for b in range(page_table.shape[0]):
        t0, t1 = starts[b], starts[b + 1]
        if t1 <= t0:
            continue
        pos = positions[t0:t1].long()
        length = int(pos.max()) + 1
        if length > max_context:
            raise ValueError(
                f"indexer_topk: sequence {b} has a token at position {length - 1} but max_context is "
                f"{max_context} (it must bound every position + 1)"
            )
        keys = _paged_rows(k, k_scale, page_table[b], length)
        out[t0:t1] = indexer.indexer_topk_reference(q[t0:t1], weights[t0:t1], keys, pos, topk)
    return out


def _indexer_fake(q, weights, k, k_scale, page_table, query_start, positions, max_new, max_context, topk):
    indexer._check(q, weights, k, page_table)
    if q.dim() != 3:
        raise ValueError(f"indexer_topk: q must be [tokens, index_n_heads, D], got shape {tuple(q.shape)}")
    return q.new_empty((q.shape[0], topk), dtype=torch.int32)


# -- sparse MLA -----------------------------------------------------------------------------------------------


def mla_config_ints(config: mla.MLAConfig | None) -> list[int] | None:
    """An MLAConfig as the op's `config` argument: its fields in declaration order, as ints."""
    return None if config is None else [int(v) for v in dataclasses.astuple(config)]


def _mla_config(values: Sequence[int] | None) -> mla.MLAConfig | None:
    if values is None:
        return None
    fields = dataclasses.fields(mla.MLAConfig)
    if len(values) != len(fields):
        raise ValueError(
            f"sparse_mla: config has {len(values)} values; MLAConfig needs {len(fields)} "
            f"({', '.join(f.name for f in fields)})"
        )
    base = mla.MLAConfig()  # each field's Python type (int or bool), from its default
    return mla.MLAConfig(**{f.name: type(getattr(base, f.name))(v) for f, v in zip(fields, values)})


def _sparse_mla_cuda(
    q_lat, q_rope, nope, rope, scale, page_table, token_seq, positions, indices, softmax_scale, max_context, config
):
    return mla.sparse_mla(
        q_lat,
        q_rope,
        nope,
        rope,
        scale,
        page_table,
        token_seq,
        positions,
        indices,
        softmax_scale,
        max_context=max_context,
        config=_mla_config(config),
    )


def _sparse_mla_cpu(
    q_lat, q_rope, nope, rope, scale, page_table, token_seq, positions, indices, softmax_scale, max_context, config
):
    _mla_config(config)
    if indices is None and max_context <= 0:
        raise ValueError("sparse_mla: dense mode (indices=None) needs max_context > 0")
    out = q_lat.new_zeros(q_lat.shape)  # contiguous, as the kernel wrapper allocates it (q_lat may be a view)
    seq_of = token_seq.long()
    for b in torch.unique(seq_of).tolist():
        tok = torch.nonzero(seq_of == b).flatten()
        pos = positions[tok].long()
        length = int(pos.max()) + 1
        latent = _paged_rows(nope, scale, page_table[b], length)
        k_rope = _paged_rows(rope, None, page_table[b], length)
        sel = None
        if indices is not None:
            # The kernel skips -1 and positions past the token's own; the reference's mask wants them as -1.
            sel = indices[tok].long()
            sel = torch.where((sel >= 0) & (sel <= pos[:, None]), sel, -1)
        o = mla.sparse_mla_reference(q_lat[tok], q_rope[tok], latent, k_rope, pos, sel, softmax_scale)
        out[tok] = torch.nan_to_num(o, nan=0.0).to(out.dtype)  # a token with nothing selected: 0, as the kernel
    return out


def _sparse_mla_fake(
    q_lat, q_rope, nope, rope, scale, page_table, token_seq, positions, indices, softmax_scale, max_context, config
):
    _mla_config(config)
    if q_lat.dim() != 3 or q_rope.dim() != 3 or q_rope.shape[:2] != q_lat.shape[:2]:
        raise ValueError(
            f"sparse_mla: q_lat [tokens, H, C] and q_rope [tokens, H, R] disagree: "
            f"{tuple(q_lat.shape)}, {tuple(q_rope.shape)}"
        )
    return q_lat.new_empty(q_lat.shape)


# -- paged-row gather -----------------------------------------------------------------------------------------


def _gather_cuda(src, scale, page_table, seq_lens, out_start, max_len, out) -> None:
    index_k_gather.gather_paged_rows(src, scale, page_table, seq_lens, out_start, max_len, out)


def _gather_cpu(src, scale, page_table, seq_lens, out_start, max_len, out) -> None:
    _gather_check(src, out)
    if seq_lens.numel() and int(seq_lens.max()) > max_len:
        raise ValueError(f"gather_paged_rows: a sequence is longer than max_len = {max_len}")
    index_k_gather.gather_paged_rows_reference(src, scale, page_table, seq_lens, out_start, out)


def _gather_check(src: torch.Tensor, out: torch.Tensor) -> None:
    if src.dim() != 3 or out.dim() != 2 or out.shape[1] != src.shape[2]:
        raise ValueError(
            f"gather_paged_rows: src must be [pages, page, D] and out [rows, D], got "
            f"{tuple(src.shape)} and {tuple(out.shape)}"
        )


def _gather_fake(src, scale, page_table, seq_lens, out_start, max_len, out) -> None:
    _gather_check(src, out)


# -- paged KV write -------------------------------------------------------------------------------------------


def _paged_store_check(pool: torch.Tensor, rows: torch.Tensor, page: torch.Tensor, offset: torch.Tensor) -> None:
    if (
        pool.dim() < 2
        or page.shape != offset.shape
        or page.dim() != 1
        or rows.shape[0] != page.shape[0]
        or rows.shape[1:] != pool.shape[2:]
    ):
        raise ValueError(
            f"paged_store: want pool [pages, page, ...], rows [n, ...] matching its row shape and "
            f"page/offset [n]; got pool {tuple(pool.shape)}, rows {tuple(rows.shape)}, page "
            f"{tuple(page.shape)}, offset {tuple(offset.shape)}"
        )


def _paged_store(pool: torch.Tensor, rows: torch.Tensor, page: torch.Tensor, offset: torch.Tensor) -> None:
    _paged_store_check(pool, rows, page, offset)
    pool.index_put_((page, offset), rows.to(pool.dtype))


def _paged_store_fake(pool: torch.Tensor, rows: torch.Tensor, page: torch.Tensor, offset: torch.Tensor) -> None:
    _paged_store_check(pool, rows, page, offset)


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    return f8l.fp8_linear(x, weight, scale, (block[0], block[1]))


def _fp8_linear_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_register("act_quant_fp8", _act_quant_cuda, _act_quant_cpu, _act_quant_fake)
_register("fp8_linear", _fp8_linear, None, _fp8_linear_fake)
_register("fused_moe", _fused_moe_cuda, _fused_moe_cpu, _fused_moe_fake)
_register("indexer_topk", _indexer_cuda, _indexer_cpu, _indexer_fake)
_register("sparse_mla", _sparse_mla_cuda, _sparse_mla_cpu, _sparse_mla_fake)
_register("gather_paged_rows", _gather_cuda, _gather_cpu, _gather_fake)
_register("paged_store", _paged_store, None, _paged_store_fake)


# -- the kernel functions' signatures, through the ops --------------------------------------------------------


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """As `fp8_linear.fp8_linear`, one opaque op (the `matmul` the engine gives model.glm.Fp8Linear on a GPU)."""
    return torch.ops.moed.fp8_linear(x, weight, scale, list(block))


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """As `act_quant.per_token_group_quant_fp8`: x [M, K] -> (q e4m3 [M, K], scale fp32 [M, ceil(K / G)])."""
    return torch.ops.moed.act_quant_fp8(x, group_size)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_to_slot: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """As `fused_moe.fused_moe` with tile configs from the tuned tables: hidden bf16 [M, K] -> bf16 [M, K]."""
    return torch.ops.moed.fused_moe(
        hidden,
        w13,
        w2,
        topk_ids,
        topk_weights,
        expert_to_slot,
        w13_scale,
        w2_scale,
        None if block_shape is None else list(block_shape),
    )


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    query_start: torch.Tensor,
    positions: torch.Tensor,
    max_new: int,
    max_context: int,
    topk: int,
) -> torch.Tensor:
    """As `indexer.indexer_topk`: [tokens, topk] int32 positions (-1 = unused); CUDA order is unspecified."""
    return torch.ops.moed.indexer_topk(
        q, weights, k, k_scale, page_table, query_start, positions, max_new, max_context, topk
    )


def sparse_mla(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    nope: torch.Tensor,
    rope: torch.Tensor,
    scale: torch.Tensor | None,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    indices: torch.Tensor | None,
    softmax_scale: float,
    max_context: int = 0,
    config: mla.MLAConfig | None = None,
) -> torch.Tensor:
    """As `sparse_mla.sparse_mla` (default split count, fresh output): o_lat [tokens, H, C] in q_lat's dtype.
    `indices` rows must not repeat a position (the indexer's never do): the kernel would count it twice."""
    return torch.ops.moed.sparse_mla(
        q_lat,
        q_rope,
        nope,
        rope,
        scale,
        page_table,
        token_seq,
        positions,
        indices,
        softmax_scale,
        max_context,
        mla_config_ints(config),
    )


def gather_paged_rows(
    src: torch.Tensor,
    scale: torch.Tensor | None,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out_start: torch.Tensor,
    max_len: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """As `index_k_gather.gather_paged_rows`: fills out [rows, D] in place and returns it."""
    torch.ops.moed.gather_paged_rows(src, scale, page_table, seq_lens, out_start, max_len, out)
    return out


def paged_store(pool: torch.Tensor, rows: torch.Tensor, page: torch.Tensor, offset: torch.Tensor) -> None:
    """pool[page, offset] = rows in place. pool: a pool view [pages, page, ...] (FP8 pools as uint8 views, which
    index_put supports); rows [n, ...] (cast to the pool's dtype); page, offset: int64 [n]."""
    torch.ops.moed.paged_store(pool, rows, page, offset)
