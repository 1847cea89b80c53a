"""The trtllm backend: flashinfer's trtllm-gen MLA decode kernels on SM100+ (Blackwell).

Not runnable on the Hopper machines this project is tested on: the argument layout below is tested
on the CPU against a torch emulation of the kernel's documented semantics, and the selection logic
(`attention.select`) refuses this backend on anything older than SM100 or without flashinfer.

What it does on SM100+: the indexer (Triton) and the pools are the Triton backend's; decode steps
(one new token per sequence) call `flashinfer.decode.trtllm_batch_decode_with_kv_cache_mla` with
- query [batch, 1, heads_padded, C + R] bf16: [q_lat | q_rope], heads zero-padded to a multiple of
  `TRTLLM_HEAD_MULTIPLE` (the output is sliced back);
- kv_cache: the layer's bf16 latent pool [pages, page_size, C + R] as it is (same row layout);
- sparse steps: block_tables [batch, 1, index_topk] int32 of physical token slots
  (page * page_size + offset, -1 unused) and sparse_mla_top_k = index_topk;
  dense steps: block_tables = the page table padded to a multiple of 128 / page_size columns;
- bmm1_scale = softmax_scale, bmm2_scale = 1.0 (bf16 cache: no quantisation scales).
Prefill steps run the Triton / dense paths: flashinfer's ragged trtllm-gen prefill
(`trtllm_ragged_attention_deepseek`) is built for DeepSeek's (192, 128) head dims, and GLM-5.1's
(256, 256) would need checking on SM100 before it is wired here.
"""

from __future__ import annotations

import torch

from moed.attention.nsa import TritonSparseAttention
from moed.attention.paged_kv import LatentView, PagedKVPool
from moed.model.attention_interface import LayerWeights, MLAInputs, PagedStep, StepContext
from moed.model.config import GlmMoeDsaConfig

TRTLLM_PAGE_SIZES = (32, 64)
TRTLLM_HEAD_MULTIPLE = 128  # conservative: the SM100 sparse MLA kernels are built for 128-head tiles
TRTLLM_WORKSPACE_BYTES = 128 << 20


def unsupported_reason(cfg: GlmMoeDsaConfig, page_size: int, latent_dtype: str) -> str | None:
    """Why trtllm-gen MLA cannot serve this model/pool, or None when it can."""
    if cfg.kv_lora_rank != 512 or cfg.qk_rope_head_dim != 64:
        return (
            f"trtllm-gen MLA needs kv_lora_rank 512 and qk_rope_head_dim 64, the model has "
            f"{cfg.kv_lora_rank} and {cfg.qk_rope_head_dim}"
        )
    if cfg.qk_nope_head_dim not in (128, 192):
        return f"trtllm-gen MLA needs qk_nope_head_dim 128 or 192, the model has {cfg.qk_nope_head_dim}"
    if page_size not in TRTLLM_PAGE_SIZES:
        return f"trtllm-gen MLA needs page size {TRTLLM_PAGE_SIZES}, the pool uses {page_size}"
    if latent_dtype != "bf16":
        return (
            f"trtllm-gen MLA reads a bf16 latent cache here; the pool's '{latent_dtype}' layout (per-token "
            "scales) is the Triton backend's"
        )
    return None


def pad_heads(x: torch.Tensor, multiple: int = TRTLLM_HEAD_MULTIPLE) -> torch.Tensor:
    """x: [tokens, H, D] -> [tokens, ceil(H / multiple) * multiple, D], zero rows appended."""
    H = x.shape[1]
    Hp = -(-H // multiple) * multiple
    if Hp == H:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], Hp - H, x.shape[2])], dim=1)


def physical_slots(
    topk: torch.Tensor, page_table: torch.Tensor, token_seq: torch.Tensor, page_size: int
) -> torch.Tensor:
    """topk: [tokens, k] positions (-1 unused) -> [tokens, k] int32 pool slots page * page_size + offset (-1 kept)."""
    valid = topk >= 0
    pos = torch.where(valid, topk, 0).long()
    page = page_table[token_seq.long()[:, None], pos // page_size].long()
    return torch.where(valid, page * page_size + pos % page_size, -1).to(torch.int32)


def decode_args(
    cfg: GlmMoeDsaConfig,
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    paged: PagedStep,
    topk: torch.Tensor | None,
    token_seq: torch.Tensor,
    workspace: torch.Tensor,
) -> dict:
    """Keyword arguments of `trtllm_batch_decode_with_kv_cache_mla` for a decode step (one token per sequence).

    q_lat: [batch, H, C], q_rope: [batch, H, R], kv_cache: [pages, page, C + R] bf16, topk: [batch, k] or None.
    """
    page_size = kv_cache.shape[1]
    query = pad_heads(torch.cat([q_lat, q_rope], dim=-1).to(torch.bfloat16))[:, None]  # [B, 1, Hp, C + R]
    if topk is not None:
        block_tables = physical_slots(topk, paged.page_table, token_seq, page_size)[:, None, :]
        sparse_k = topk.shape[1]
    else:
        cols = paged.page_table.shape[1]
        step = 128 // page_size
        pad = -(-cols // step) * step - cols
        block_tables = torch.nn.functional.pad(paged.page_table, (0, pad)) if pad else paged.page_table
        sparse_k = 0
    return dict(
        query=query,
        kv_cache=kv_cache,
        workspace_buffer=workspace,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        block_tables=block_tables,
        seq_lens=paged.seq_lens,
        max_seq_len=paged.max_context,
        sparse_mla_top_k=sparse_k,
        bmm1_scale=cfg.softmax_scale,
        bmm2_scale=1.0,
    )


def emulate_decode(args: dict) -> torch.Tensor:
    """What the kernel computes from `decode_args` (its documented semantics), in torch fp32 -> [B, 1, Hp, C]."""
    q, kv, C = args["query"].float(), args["kv_cache"], args["kv_lora_rank"]
    B, page_size = q.shape[0], kv.shape[1]
    flat = kv.reshape(-1, kv.shape[-1]).float()
    out = []
    for b in range(B):
        if args["sparse_mla_top_k"]:
            slots = args["block_tables"][b, 0]
            slots = slots[slots >= 0].long()
        else:
            n = int(args["seq_lens"][b])
            pos = torch.arange(n, device=kv.device)
            slots = args["block_tables"][b, pos // page_size].long() * page_size + pos % page_size
        rows = flat[slots]  # [n, C + R]
        s = torch.einsum("hd,nd->hn", q[b, 0], rows) * args["bmm1_scale"]
        out.append((torch.softmax(s, dim=-1) @ rows[:, :C] * args["bmm2_scale"])[None])
    return torch.stack(out)


class TrtllmAttention(TritonSparseAttention):
    name = "trtllm"

    def __init__(self, cfg: GlmMoeDsaConfig, pool: PagedKVPool, dense_threshold: int | None = None) -> None:
        reason = unsupported_reason(cfg, pool.page_size, pool.latent_dtype)
        if reason is not None:
            raise ValueError(reason)
        import flashinfer.decode  # noqa: F401  (the selector checked it is installed)

        super().__init__(cfg, pool, dense_threshold)
        self._workspace = torch.zeros(TRTLLM_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)

    def _absorbed(
        self,
        layer: int,
        weights: LayerWeights,
        mla: MLAInputs,
        view: LatentView,
        paged: PagedStep,
        ctx: StepContext,
        topk: torch.Tensor | None,
    ) -> torch.Tensor:
        if paged.max_new != 1 or mla.q_nope.shape[0] != paged.page_table.shape[0]:
            return super()._absorbed(layer, weights, mla, view, paged, ctx, topk)
        import flashinfer.decode

        cfg = self.cfg
        H, dn, dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        T = mla.q_nope.shape[0]
        w = weights.kv_b_proj.view(H, dn + dv, C)
        q_lat = torch.bmm(mla.q_nope.transpose(0, 1), w[:, :dn, :]).transpose(0, 1)
        kv_cache = self.pool.latent[self.pool.layer_slot[layer]]
        args = decode_args(cfg, q_lat, mla.q_rope, kv_cache, paged, topk, paged.token_seq, self._workspace)
        o_lat = flashinfer.decode.trtllm_batch_decode_with_kv_cache_mla(**args)[:, 0, :H]  # [T, H, C]
        out = torch.bmm(o_lat.to(w.dtype).transpose(0, 1), w[:, dn:, :].transpose(1, 2))
        return out.transpose(0, 1).reshape(T, H * dv)
