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
when `DecodeGraphs` was set up and covers the batch; any other step of at least `compiled.min_tokens`
tokens runs its decoder layers through torch.compile when `CompiledPrefill` was set up
(engine/compiled.py); everything else runs eagerly.

Packing is split in two so the engine can time (and overlap) them apart: `prepare` builds the step
on the host (no device work), `upload` sends it in two copies from pinned memory (never blocking
the host) and fills in the input tokens still being sampled by the step in flight (`PendingTokens`,
a `PENDING` entry in `token_ids`) from that step's token tensor on the device:

    ints   int64 [T + T + 2 * D]: input ids (0 where pending), positions, then D pending
           (packed row, row in PendingTokens.tokens) pairs as two runs of D
    paged  int32 [B * W + B + B + 1 + T]: page table [B, W], seq_lens, query_start, token_seq
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from moed.attention.paged_kv import is_paged
from moed.engine.compiled import CompiledPrefill
from moed.engine.cuda_graphs import DecodeGraphs
from moed.engine.scheduler import ScheduledSeq
from moed.engine.sequence import PENDING, Sequence
from moed.model.attention_interface import AttentionBackend, PagedStep, SequenceStep, StepContext
from moed.model.glm import GlmMoeDsaForCausalLM
from moed.model.moe import MoERunner


def new_cache(backend: Any, seq: Sequence) -> Any:
    """A backend's per-sequence cache handle (paged backends: the page list, which the step context carries)."""
    if is_paged(backend):
        return seq.pages
    return backend.new_sequence()


def build_paged_step(page_lists: list[list[int]], steps: list[SequenceStep], device: torch.device) -> PagedStep:
    """The paged backends' step tensors for `steps` (row b uses `page_lists[b]`), in one upload."""
    return upload_paged_step(paged_step_host(page_lists, steps), steps, device)


def paged_step_host(page_lists: list[list[int]], steps: list[SequenceStep]) -> torch.Tensor:
    """The int32 host buffer of `build_paged_step` (layout in the module docstring)."""
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
    host[o : o + B] = torch.tensor(lens, dtype=torch.int32)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    host[o + B : o + 2 * B + 1] = torch.tensor(starts, dtype=torch.int32)
    host[o + 2 * B + 1 :] = torch.repeat_interleave(torch.arange(B, dtype=torch.int32), torch.tensor(new))
    return host


def upload_paged_step(host: torch.Tensor, steps: list[SequenceStep], device: torch.device) -> PagedStep:
    B = len(steps)
    new = [s.num_new for s in steps]
    lens = [s.context_len for s in steps]
    width = (host.numel() - 2 * B - 1 - sum(new)) // B
    o = B * width
    dev = _upload(host, device)
    return PagedStep(
        page_table=dev[: B * width].view(B, width),
        seq_lens=dev[o : o + B],
        query_start=dev[o + B : o + 2 * B + 1],
        token_seq=dev[o + 2 * B + 1 :],
        max_context=max(max(lens), 1),
        max_new=max(max(new), 1),
    )


@dataclasses.dataclass
class PendingTokens:
    """Tokens the step in flight samples, still on the device: inputs of the next step before they are read back."""

    tokens: torch.Tensor  # [rows] int64, on the device
    row_of: dict[int, int]  # id(sequence) -> its row in `tokens`

    def row(self, seq: Sequence) -> int:
        row = self.row_of.get(id(seq))
        if row is None:
            raise RuntimeError(f"{seq} feeds a pending token that the step in flight does not sample")
        return row

    def gather(self, seqs: list[Sequence], fill: int, index: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """[len(seqs)] int64 on the device: each sequence's pending token, `fill` where it has none."""
        n = self.tokens.shape[0]
        rows = index([self.row_of.get(id(s), n) for s in seqs])
        return torch.cat([self.tokens, self.tokens.new_full((1,), fill)])[rows]


@dataclasses.dataclass
class HostStep:
    """A step packed on the host (`ModelRunner.prepare`), ready for `ModelRunner.upload`."""

    ints: torch.Tensor  # int64 [2 * T + 2 * D], layout in the module docstring
    num_tokens: int  # T
    num_pending: int  # D
    steps: list[SequenceStep]
    paged: torch.Tensor | None  # int32, paged backends only


class ModelRunner:
    def __init__(
        self, model: GlmMoeDsaForCausalLM, backend: AttentionBackend, moe: MoERunner, device: torch.device
    ) -> None:
        self.model, self.backend, self.moe, self.device = model, backend, moe, device
        self.paged = is_paged(backend)
        self.graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # steps served by a CUDA graph (stats, tests)
        self.compiled: CompiledPrefill | None = None

    def prepare(self, items: list[ScheduledSeq], pending: PendingTokens | None = None) -> HostStep:
        """Pack the step on the host (caches created for sequences that have none); no device work."""
        ids: list[int] = []
        positions: list[int] = []
        dst: list[int] = []  # packed rows whose token is still being sampled
        src: list[int] = []  # ... and its row in pending.tokens
        steps: list[SequenceStep] = []
        for it in items:
            seq = it.seq
            if seq.kv is None:
                seq.kv = new_cache(self.backend, seq)
            tokens = it.input_token_ids()
            if seq.num_pending and PENDING in tokens:
                if pending is None:
                    raise RuntimeError(f"{seq} feeds a token that is still being sampled and no step is in flight")
                j = tokens.index(PENDING)
                dst.append(len(ids) + j)
                src.append(pending.row(seq))
                tokens[j] = 0
            ids += tokens
            positions += range(seq.num_computed, seq.num_computed + it.num_new)
            steps.append(SequenceStep(num_cached=seq.num_computed, num_new=it.num_new, kv=seq.kv))
        paged = paged_step_host([it.seq.pages for it in items], steps) if self.paged else None
        return HostStep(torch.tensor(ids + positions + dst + src, dtype=torch.int64), len(ids), len(dst), steps, paged)

    def upload(self, host: HostStep, pending: PendingTokens | None = None) -> tuple[torch.Tensor, StepContext]:
        """input_ids: [tokens] int64 and the step's context, on the device; pending tokens copied in on the device."""
        T, D = host.num_tokens, host.num_pending
        dev = _upload(host.ints, self.device)
        input_ids = dev[:T]
        if D:
            assert pending is not None
            input_ids = input_ids.index_copy(0, dev[2 * T : 2 * T + D], pending.tokens[dev[2 * T + D :]])
        ctx = StepContext(positions=dev[T : 2 * T], seqs=host.steps)
        if host.paged is not None:
            ctx.paged = upload_paged_step(host.paged, host.steps, self.device)
        return input_ids, ctx

    def pack(self, items: list[ScheduledSeq], pending: PendingTokens | None = None) -> tuple[torch.Tensor, StepContext]:
        """input_ids: [tokens] int64 and the step's context (prepare, then upload)."""
        return self.upload(self.prepare(items, pending), pending)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """-> final-normed hidden states [tokens, hidden_size] of an uploaded step (replayed when a graph covers it)."""
        if self.graphs is not None:
            hidden = self.graphs.run(input_ids, ctx)
            if hidden is not None:
                self.graph_steps += 1
                return hidden
        if self.compiled is not None and self.compiled.covers(input_ids.shape[0]):
            hidden = self.compiled.forward(self.model, input_ids, ctx, self.backend, self.moe)
            if hidden is not None:  # None: compiling failed (logged once): this and later steps run eagerly
                return hidden
        return self.model(input_ids, ctx, self.backend, self.moe)

    def index(self, rows: list[int]) -> torch.Tensor:
        """Row indices [rows] int64 on the device, uploaded without blocking the host."""
        return _ints(rows, self.device)

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
