"""The dense short-context path: exact attention over every causal position when contexts are short.

When every context of a step is no longer than the threshold, the indexer would select every causal
position anyway, so attending to all of them is exact and skips the indexer. The threshold defaults
to the model's `index_topk`; it can be set in config or by the environment variable named below.
A value above `index_topk` makes contexts between the two attend densely to positions the model
would have dropped: results then differ from the model's sparse selection, and cost more.

Prefill (a step with more than one new token in some sequence) runs one-shot multi-head attention:
the cached latents are gathered from the pool (`kernels.index_k_gather`), expanded by kv_b_proj to
K [ctx, H, qk_nope + rope] and V [ctx, H, v_head_dim], and attended with torch's fused attention,
causal aligned to the end of the context. Decode steps use the absorbed MLA kernel over all causal
positions (`kernels.sparse_mla` in dense mode), which reads only latents.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from moed.attention.paged_kv import LatentView
from moed.kernels.index_k_gather import gather_paged_rows
from moed.model.attention_interface import MLAInputs, PagedStep, SequenceStep
from moed.model.config import GlmMoeDsaConfig

log = logging.getLogger(__name__)

DENSE_THRESHOLD_ENV = "MOED_DENSE_ATTN_KV_LEN_THRESHOLD"


def resolve_dense_threshold(cfg: GlmMoeDsaConfig, configured: int | None = None) -> int:
    """The context length up to which steps run dense: `configured`, else the env var, else index_topk."""
    value, source = configured, "config"
    if value is None and os.environ.get(DENSE_THRESHOLD_ENV):
        raw, source = os.environ[DENSE_THRESHOLD_ENV], f"env {DENSE_THRESHOLD_ENV}"
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(
                f"{source}={raw!r} is not an integer (a context length in tokens; 0 disables the dense path)"
            ) from None
    if value is None:
        return cfg.index_topk
    if value < 0:
        raise ValueError(f"dense attention threshold from {source} must be >= 0, got {value}")
    if value > cfg.index_topk:
        log.warning(
            "dense attention threshold %d (from %s) is above index_topk=%d: contexts of %d..%d tokens "
            "attend to every position instead of the top-%d the model selects, which changes results and "
            "costs speed",
            value,
            source,
            cfg.index_topk,
            cfg.index_topk + 1,
            value,
            cfg.index_topk,
        )
    return value


def mha_prefill(
    cfg: GlmMoeDsaConfig,
    kv_b_proj: torch.Tensor,
    mla: MLAInputs,
    view: LatentView,
    paged: PagedStep,
    seqs: list[SequenceStep],
) -> torch.Tensor:
    """Dense causal MHA for a step whose new latents are already in the pool -> [tokens, H * v_head_dim]."""
    H, dn, dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    dtype = mla.q_nope.dtype
    lens = [s.context_len for s in seqs]
    total = sum(lens)
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    out_start = (torch.cumsum(paged.seq_lens, 0) - paged.seq_lens).to(torch.int32)
    latent = torch.empty(total, C, dtype=dtype, device=mla.q_nope.device)
    k_rope = torch.empty(total, view.rope.shape[2], dtype=dtype, device=latent.device)
    max_len = max(lens)
    gather_paged_rows(view.nope, view.scale, paged.page_table, paged.seq_lens, out_start, max_len, latent)
    gather_paged_rows(view.rope, None, paged.page_table, paged.seq_lens, out_start, max_len, k_rope)
    kv = F.linear(latent, kv_b_proj).view(total, H, dn + dv)
    out = torch.empty(mla.q_nope.shape[0], H, dv, dtype=dtype, device=latent.device)
    t = 0
    for s, kv_start in zip(seqs, starts):
        L, n = s.context_len, s.num_new
        if n == 0:
            continue
        kv_s = kv[kv_start : kv_start + L]
        k = torch.cat([kv_s[..., :dn], k_rope[kv_start : kv_start + L, None, :].expand(-1, H, -1)], dim=-1)
        q = torch.cat([mla.q_nope[t : t + n], mla.q_rope[t : t + n]], dim=-1)
        mask = None
        if s.num_cached:
            # Causal, aligned to the end: new token i sees positions <= num_cached + i.
            mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=s.num_cached)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            kv_s[..., dn:].transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=cfg.softmax_scale,
        )
        out[t : t + n] = o.transpose(0, 1)
        t += n
    return out.reshape(out.shape[0], H * dv)
