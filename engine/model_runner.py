"""Runs one scheduled step through the network: packs the tokens, builds the StepContext, returns hidden states.

Tokens of the step are packed sequence by sequence in batch order (decode items first), each
sequence's run of `num_new` tokens at positions `num_computed .. num_computed + num_new - 1`. The
StepContext is built here once per step and read by every layer's attention. Logits are computed
only for the rows that are sampled (the last token of a sequence, or every verified position).

Caches: the reference backend keeps its own growing per-sequence tensors (`seq.kv` is its
`ReferenceKV`). A paged backend (one with a `PagedKVPool`) gets `StepContext.paged`, built here
from the engine's page lists (`seq.pages`, managed by `KVPages`): page table [batch, max_pages]
int32 (unused entries 0, the pool's scratch page), context lengths, query offsets and each token's
row, uploaded in one host-to-device copy. There `seq.kv` is only a marker that the sequence has
begun (pages need no rollback: rejected draft positions are overwritten later).

A decode step (every sequence feeds `tokens_per_seq` tokens) goes through a captured CUDA graph
when `DecodeGraphs` was set up and covers the batch; everything else runs eagerly.
"""

from __future__ import annotations

from typing import Any

import torch

from moed.attention.interface import AttentionBackend, PagedStep, SequenceStep, StepContext
from moed.attention.paged_kv import PagedKVPool
from moed.engine.cuda_graphs import DecodeGraphs
from moed.engine.scheduler import ScheduledSeq
from moed.engine.sequence import Sequence
from moed.model.glm import GlmMoeDsaForCausalLM
from moed.model.moe import MoERunner


def is_paged(backend: Any) -> bool:
    return isinstance(getattr(backend, "pool", None), PagedKVPool)


def new_cache(backend: Any, seq: Sequence) -> Any:
    """A backend's per-sequence cache handle (paged backends: the page list, which the step context carries)."""
    if is_paged(backend):
        return seq.pages
    return backend.new_sequence()


def build_paged_step(page_lists: list[list[int]], steps: list[SequenceStep], device: torch.device) -> PagedStep:
    """The paged backends' step tensors for `steps` (row b uses `page_lists[b]`), in one upload."""
    B = len(steps)
    width = max(1, max(len(p) for p in page_lists))
    new = [s.num_new for s in steps]
    T = sum(new)
    host = torch.zeros(B * width + B + (B + 1) + T, dtype=torch.int32)
    table = host[: B * width].view(B, width)
    for b, pages in enumerate(page_lists):
        if pages:
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    lens = [s.context_len for s in steps]
    o = B * width
    host[o: o + B] = torch.tensor(lens, dtype=torch.int32)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    host[o + B: o + 2 * B + 1] = torch.tensor(starts, dtype=torch.int32)
    host[o + 2 * B + 1:] = torch.repeat_interleave(torch.arange(B, dtype=torch.int32), torch.tensor(new))
    dev = _upload(host, device)
    return PagedStep(page_table=dev[: B * width].view(B, width), seq_lens=dev[o: o + B],
                     query_start=dev[o + B: o + 2 * B + 1], token_seq=dev[o + 2 * B + 1:],
                     max_context=max(max(lens), 1), max_new=max(max(new), 1))


class ModelRunner:
    def __init__(self, model: GlmMoeDsaForCausalLM, backend: AttentionBackend, moe: MoERunner,
                 device: torch.device) -> None:
        self.model, self.backend, self.moe, self.device = model, backend, moe, device
        self.paged = is_paged(backend)
        self.graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # steps served by a CUDA graph (stats, tests)

    def pack(self, items: list[ScheduledSeq]) -> tuple[torch.Tensor, StepContext]:
        """input_ids: [tokens] int64 and the step's context (caches created for sequences that have none)."""
        ids: list[int] = []
        positions: list[int] = []
        steps: list[SequenceStep] = []
        for it in items:
            seq = it.seq
            if seq.kv is None:
                seq.kv = new_cache(self.backend, seq)
            ids += it.input_token_ids()
            positions += range(seq.num_computed, seq.num_computed + it.num_new)
            steps.append(SequenceStep(num_cached=seq.num_computed, num_new=it.num_new, kv=seq.kv))
        ctx = StepContext(positions=_ints(positions, self.device), seqs=steps)
        if self.paged:
            ctx.paged = build_paged_step([it.seq.pages for it in items], steps, self.device)
        return _ints(ids, self.device), ctx

    @torch.inference_mode()
    def forward(self, items: list[ScheduledSeq]) -> torch.Tensor:
        """-> final-normed hidden states [tokens, hidden_size] of the packed step."""
        input_ids, ctx = self.pack(items)
        if self.graphs is not None:
            hidden = self.graphs.run(input_ids, ctx)
            if hidden is not None:
                self.graph_steps += 1
                return hidden
        return self.model(input_ids, ctx, self.backend, self.moe)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, hidden_size] -> fp32 logits [rows, vocab_size]."""
        return self.model.logits(hidden).float()


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return _upload(torch.tensor(values, dtype=torch.int64), device)
