"""Plain-torch attention backend: the CPU path and the oracle every kernel backend is tested against.

It computes what transformers' `GlmMoeDsaAttention` computes (eager path): the indexer scores
`sum_h w_h * relu(q_h . k * index_head_dim**-0.5)` over the causal prefix, the top-`index_topk`
positions, and MLA attention with K and V expanded from the cached latents by `kv_b_proj`,
restricted to the selected positions. When a context is no longer than `index_topk` every causal
position is selected, so the indexer is skipped: that is exact, not an approximation.

Cache: one `ReferenceKV` per sequence, holding per layer the latents `[len, kv_lora_rank]`, the
roped shared key `[len, qk_rope_head_dim]` and the indexer key `[len, index_head_dim]`, in the
compute dtype (fp32 for index keys, as the reference scores them).
"""

from __future__ import annotations

import torch

from moed.model.attention_interface import IndexerInputs, LayerWeights, MLAInputs, StepContext
from moed.model.config import GlmMoeDsaConfig


class ReferenceKV:
    """Per-sequence cache of the reference backend; grows by doubling so appends stay amortised O(1)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, str], torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    def append(self, layer: int, **parts: torch.Tensor) -> dict[str, torch.Tensor]:
        start = self.lengths.get(layer, 0)
        out = {}
        for name, new in parts.items():
            key = (layer, name)
            buf = self._bufs.get(key)
            need = start + new.shape[0]
            if buf is None or buf.shape[0] < need:
                cap = max(need, 2 * (buf.shape[0] if buf is not None else 16))
                grown = new.new_empty((cap, *new.shape[1:]))
                if buf is not None:
                    grown[:start] = buf[:start]
                self._bufs[key] = buf = grown
            buf[start:need] = new
            out[name] = buf[:need]
        self.lengths[layer] = start + next(iter(parts.values())).shape[0]
        return out

    def truncate(self, length: int) -> None:
        """Forget positions >= length (speculative decoding rolls rejected drafts back this way)."""
        for layer, n in self.lengths.items():
            self.lengths[layer] = min(n, length)


class ReferenceAttention:
    def __init__(self, config: GlmMoeDsaConfig) -> None:
        self.cfg = config

    def new_sequence(self) -> ReferenceKV:
        return ReferenceKV()

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
        outs, topks = [], []
        any_sparse = False
        start = 0
        for seq in ctx.seqs:
            sl = slice(start, start + seq.num_new)
            start += seq.num_new
            parts = {"latent": mla.latent[sl], "k_rope": mla.k_rope[sl]}
            if indexer is not None:
                parts["index_k"] = indexer.k[sl].float()
            cache = seq.kv.append(layer, **parts)
            L, n = seq.context_len, seq.num_new
            q_pos = torch.arange(seq.num_cached, L, device=mla.latent.device)
            causal = torch.arange(L, device=q_pos.device)[None, :] <= q_pos[:, None]  # [n, L]
            if indexer is not None:
                topk = None
                if L > cfg.index_topk:
                    topk = self._select(indexer, sl, cache["index_k"], causal)
            else:
                topk = None if prev_topk is None else prev_topk[sl]
            allowed = causal
            if topk is not None:
                any_sparse = True
                # Unused entries (-1) scatter into a spare column L, dropped after.
                chosen = causal.new_zeros(n, L + 1)
                chosen.scatter_(1, torch.where(topk >= 0, topk, L).long(), True)
                allowed = causal & chosen[:, :L]
            outs.append(self._mla(weights, mla, sl, cache["latent"], cache["k_rope"], allowed))
            topks.append(topk if topk is not None else _all_positions(q_pos, L, cfg.index_topk))
        out = torch.cat(outs, dim=0)
        return out, (torch.cat(topks, dim=0) if any_sparse else None)

    def _select(self, ix: IndexerInputs, sl: slice, index_k: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q = ix.q[sl].float()  # [n, Hi, D]
        scores = torch.einsum("nhd,ld->nhl", q, index_k) * cfg.index_head_dim**-0.5
        scores = torch.relu(scores)
        index_scores = torch.einsum("nh,nhl->nl", ix.weights[sl].float(), scores)
        index_scores = index_scores.masked_fill(~causal, float("-inf"))
        k = min(cfg.index_topk, index_scores.shape[-1])
        vals, idx = index_scores.topk(k, dim=-1)
        return torch.where(torch.isinf(vals), -1, idx).to(torch.int32)

    def _mla(
        self,
        w: LayerWeights,
        mla: MLAInputs,
        sl: slice,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        H, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        kv = torch.nn.functional.linear(latent, w.kv_b_proj).view(latent.shape[0], H, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]  # [L, H, dn], [L, H, dv]
        q = torch.cat([mla.q_nope[sl], mla.q_rope[sl]], dim=-1)  # [n, H, dn + dr]
        k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, H, -1)], dim=-1)  # [L, H, dn + dr]
        scores = torch.einsum("nhd,lhd->hnl", q, k) * cfg.softmax_scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.einsum("hnl,lhd->nhd", probs, v)
        return out.reshape(out.shape[0], H * dv)


def _all_positions(q_pos: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """The selection of a query whose prefix fits in top-k: every causal position, -1 after."""
    cols = torch.arange(k, device=q_pos.device)[None, :]
    return torch.where(cols <= q_pos[:, None], cols, -1).to(torch.int32)
