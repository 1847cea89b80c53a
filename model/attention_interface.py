"""The attention backend interface: what the GLM-5.1 network hands attention, and what it gets back.

It lives with the network that calls it (as the MoE runner interface does, model/moe.py); the backends in
attention/ implement it. The network computes every projection (q_a/q_b, kv_a, the indexer's
wq_b/wk/weights_proj), the norms and the rotary embedding; a backend owns the KV cache and computes, per
layer: the DSA indexer's top-`index_topk` selection and MLA attention restricted to it. The output is the
per-head attention result before `o_proj`.

Tokens of all sequences in a step are packed along one axis (`tokens`), sequence by sequence, in
the order of `StepContext.seqs`. Paged backends also read `StepContext.paged`: explicit per-step
tensors (page table, lengths, offsets) that the runner builds once per step, e.g. in CUDA-graph
static buffers; a backend never reads host copies of them on the decode path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch


@dataclasses.dataclass
class MLAInputs:
    q_nope: torch.Tensor  # [tokens, heads, qk_nope_head_dim]
    q_rope: torch.Tensor  # [tokens, heads, qk_rope_head_dim], rotary applied
    latent: torch.Tensor  # [tokens, kv_lora_rank], kv_a_layernorm applied (what the cache stores)
    k_rope: torch.Tensor  # [tokens, qk_rope_head_dim], rotary applied (what the cache stores)


@dataclasses.dataclass
class IndexerInputs:
    q: torch.Tensor  # [tokens, index_n_heads, index_head_dim], rotary applied to the first rope dims
    k: torch.Tensor  # [tokens, index_head_dim], k_norm and rotary applied (what the cache stores)
    weights: torch.Tensor  # [tokens, index_n_heads] fp32: weights_proj(x) * index_n_heads**-0.5


@dataclasses.dataclass
class SequenceStep:
    """One sequence's part of a step: `num_new` tokens appended after `num_cached` cached ones."""

    num_cached: int
    num_new: int
    kv: Any  # the backend's per-sequence cache handle

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclasses.dataclass
class PagedStep:
    """The per-step inputs of a paged backend, as device tensors (row b = `StepContext.seqs[b]`).

    Host ints here are upper bounds used only to size kernel grids and scratch buffers; a CUDA-graph
    runner may round them up to its capture bucket and pad rows (padded rows point at page 0, which
    pools reserve as a scratch page, and have zero new tokens).
    """

    page_table: torch.Tensor  # [batch, max_pages] int32: pool page holding positions [i*page, (i+1)*page)
    seq_lens: torch.Tensor  # [batch] int32: context length after this step (num_cached + num_new)
    query_start: torch.Tensor  # [batch + 1] int32: offset of each sequence's first new token (cumulative)
    token_seq: torch.Tensor  # [tokens] int32: row of page_table that each packed token belongs to
    max_context: int  # >= every seq_len
    max_new: int  # >= every num_new
    derived: dict[str, Any] = dataclasses.field(default_factory=dict)  # backend values computed once per step


@dataclasses.dataclass
class StepContext:
    """Built once per step by the runner; read by every layer's attention."""

    positions: torch.Tensor  # [tokens] int64, position of each token in its sequence
    seqs: list[SequenceStep]
    paged: PagedStep | None = None  # set by a runner driving a paged backend; None: the backend builds it

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


@dataclasses.dataclass
class LayerWeights:
    """What a backend needs of the layer's own weights (kv_b is absorbed or expanded by the backend)."""

    kv_b_proj: torch.Tensor  # [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]


class AttentionBackend(Protocol):
    def attend(
        self,
        layer: int,
        weights: LayerWeights,
        mla: MLAInputs,
        indexer: IndexerInputs | None,
        prev_topk: torch.Tensor | None,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store this step's latents and index keys, select, attend.

        `indexer` is None on layers whose indexer type is "shared": they reuse `prev_topk`, the
        selection returned by the previous full layer. Returns `out: [tokens, heads * v_head_dim]`
        and this layer's selection `topk: [tokens, k]` (positions in the sequence, -1 = unused)
        or None when every query attends to its whole causal prefix.
        """
        ...
