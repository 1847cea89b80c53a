"""The Triton DSA backend: indexer + top-k + sparse MLA over paged pools, dense path for short contexts.

Per layer and step (`attend`):
1. the step's latents, roped keys and index keys are written into the pools at each token's slot;
2. if every context is <= the dense threshold (`attention.dense`), attention is exact and dense:
   one-shot MHA for prefill steps, absorbed MLA over all causal positions for decode steps; no
   selection is returned (as the reference returns none);
3. otherwise the indexer scores every causal position and keeps the top `index_topk` (layers with a
   shared indexer reuse the previous layer's selection), and absorbed sparse MLA attends to those.
   Queries whose prefix is no longer than `index_topk` get every causal position: a batch mixing
   short and long contexts is exact for each sequence.

kv_b_proj is absorbed per call: q_lat = q_nope @ W_UK and out = o_lat @ W_UV^T (batched GEMMs over
heads). Inputs per step are the tensors of `StepContext.paged` (the runner's, or built here from
the `PagedSequence` handles when there is no runner); the decode path reads no host copy of them.
"""

from __future__ import annotations

import torch

from moed.attention.dense import mha_prefill, resolve_dense_threshold
from moed.attention.paged_kv import LatentView, PagedKVPool, PagedSequence, build_paged_step
from moed.kernels.indexer import indexer_topk
from moed.kernels.sparse_mla import MLAConfig, sparse_mla
from moed.model.attention_interface import IndexerInputs, LayerWeights, MLAInputs, PagedStep, StepContext
from moed.model.config import GlmMoeDsaConfig


class TritonSparseAttention:
    name = "triton"

    def __init__(
        self,
        cfg: GlmMoeDsaConfig,
        pool: PagedKVPool,
        dense_threshold: int | None = None,
        mla_config: MLAConfig | None = None,
    ) -> None:
        if pool.cfg is not cfg and pool.cfg != cfg:
            raise ValueError("TritonSparseAttention: the KV pool was built for a different model config")
        self.cfg, self.pool = cfg, pool
        self.dense_threshold = resolve_dense_threshold(cfg, dense_threshold)
        self.mla_config = mla_config

    def new_sequence(self) -> PagedSequence:
        return PagedSequence(self.pool)

    def paged_step(self, ctx: StepContext) -> PagedStep:
        if ctx.paged is None:
            ctx.paged = build_paged_step(ctx.seqs, self.pool.page_size, self.pool.device)
        return ctx.paged

    def attend(
        self,
        layer: int,
        weights: LayerWeights,
        mla: MLAInputs,
        indexer: IndexerInputs | None,
        prev_topk: torch.Tensor | None,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        paged = self.paged_step(ctx)
        slots = paged.derived.get("slots")
        if slots is None:
            slots = paged.derived["slots"] = self.pool.slots(paged, ctx.positions)
        self.pool.store(layer, mla.latent, mla.k_rope, indexer.k if indexer is not None else None, *slots)
        view = self.pool.latent_view(layer)
        if paged.max_context <= self.dense_threshold:
            if paged.max_new > 1:
                return mha_prefill(cfg, weights.kv_b_proj, mla, view, paged, ctx.seqs), None
            return self._absorbed(layer, weights, mla, view, paged, ctx, None), None
        if indexer is not None:
            iv = self.pool.index_view(layer)
            topk = indexer_topk(
                indexer.q,
                indexer.weights,
                iv.k,
                iv.scale,
                paged.page_table,
                paged.query_start,
                ctx.positions,
                paged.max_new,
                paged.max_context,
                cfg.index_topk,
            )
        elif prev_topk is not None:
            topk = prev_topk
        else:
            raise ValueError(
                f"layer {layer} shares its indexer but the previous layer returned no selection "
                "(a step must be dense or sparse in all layers)"
            )
        return self._absorbed(layer, weights, mla, view, paged, ctx, topk), topk

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
        cfg = self.cfg
        H, dn, dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        T = mla.q_nope.shape[0]
        w = weights.kv_b_proj.view(H, dn + dv, C)
        q_lat = torch.bmm(mla.q_nope.transpose(0, 1), w[:, :dn, :]).transpose(0, 1)  # [T, H, C]
        o_lat = sparse_mla(
            q_lat,
            mla.q_rope,
            view.nope,
            view.rope,
            view.scale,
            paged.page_table,
            paged.token_seq,
            ctx.positions,
            topk,
            cfg.softmax_scale,
            max_context=paged.max_context,
            config=self.mla_config,
        )
        out = torch.bmm(o_lat.transpose(0, 1), w[:, dn:, :].transpose(1, 2))  # [H, T, dv]
        return out.transpose(0, 1).reshape(T, H * dv)
