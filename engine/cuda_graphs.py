"""CUDA graphs for decode steps: captured once per batch-size bucket, replayed with static input buffers.

A decode step feeds `tokens_per_seq` tokens per sequence (1, or 1 + draft tokens when verifying).
For each bucket size B (1, 2, 4, 8, then multiples of 8 up to `max_batch`) one graph is captured
over `B * tokens_per_seq` tokens; a step of n <= B sequences replays the smallest such bucket with
rows n.. padded. All graphs share one memory pool and the static buffers of `StaticDecodeInputs`
(Tmax = max_batch * tokens_per_seq, Pmax = ceil(max_context / page_size)):

    input_ids   [Tmax] int64        token ids, packed sequence by sequence (padding: 0)
    positions   [Tmax] int64        their positions (padding: 0 .. tokens_per_seq - 1)
    page_table  [max_batch, Pmax] int32   the rows of the step's sequences; padding rows and unused
                                          columns are 0, the pool's scratch page
    seq_lens    [max_batch] int32   context length after the step (padding rows: tokens_per_seq)
    query_start [max_batch + 1] int32, token_seq [Tmax] int32   fixed: B rows of tokens_per_seq
    outputs[B]  [B * tokens_per_seq, hidden_size]  the captured final hidden states (pool memory)

A replay copies the step's ids, positions, page table and lengths into the buffers (device to
device) and replays: no host sync and no allocation. A padded row is a well-formed sequence of
exactly its tokens_per_seq new tokens at positions 0.. (no cached context), so every kernel sees the
invariant seq_len = cached + new, and it writes its keys to the scratch page only. The graphs are
captured with `max_context` as the bound the kernels size their grids by, so a step whose longest
context exceeds it runs eagerly instead. A backend chooses its dense or selection path from that
bound (a host int): multi-token (verify) graphs must be captured above the dense threshold, since
dense multi-token attention reads host lengths (the engine sees to it).

What may be captured: an attention backend with a paged pool (its decode path reads only
`StepContext.paged`) and an MoE runner that never syncs or branches on device values on its step
path (the expert-cache miss path included). A runner says so with `supports_cuda_graphs`; the
offload runner qualifies when its misses take the SM copy path (CPU experts are handed their jobs by
stream memory operations, which are captured too).
After capture every bucket is checked against an eager run of the same step: a backend that
cannot really be captured is caught there, and graphs are turned off with the reason logged.
With compile_decode the graphs capture the torch.compile'd layers (engine/compiled.py, `CompiledDecode`); if
compiling fails, the eager layers are captured instead (the reason logged).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moed.attention.paged_kv import is_paged
from moed.engine.compiled import CompiledDecode, describe_failure
from moed.engine.config import EngineConfig
from moed.model.attention_interface import PagedStep, SequenceStep, StepContext

log = logging.getLogger(__name__)


def graph_capable(backend: Any, moe: Any) -> tuple[bool, str]:
    """(capturable, why not) for this attention backend and MoE runner."""
    if not is_paged(backend) or getattr(backend, "supports_cuda_graphs", True) is False:
        return False, f"attention backend {type(backend).__name__} is not a paged backend"
    if not getattr(moe, "supports_cuda_graphs", False):
        return False, (
            f"MoE runner {type(moe).__name__} syncs on its step path (copy-engine misses or per-expert host loops)"
        )
    return True, ""


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class StaticDecodeInputs:
    """The decode graphs' static input buffers (module docstring) and their step contexts, one per bucket size.

    `fill` writes a step of n <= bs sequences into them for bucket bs; plain tensor copies, so it runs (and is
    tested) on any device, and inside a graph replay's stream without a host sync."""

    def __init__(
        self, device: torch.device, max_batch: int, tokens_per_seq: int, max_context: int, page_size: int
    ) -> None:
        B, T = max_batch, max_batch * tokens_per_seq
        self.tokens_per_seq, self.max_context = tokens_per_seq, max_context
        self.max_pages = -(-max_context // page_size)
        i32 = {"dtype": torch.int32, "device": device}
        self.input_ids = torch.zeros(T, dtype=torch.int64, device=device)
        # A padded sequence: tokens_per_seq new tokens at positions 0.., no cached context (seq_len = its tokens).
        self.pad_positions = torch.arange(tokens_per_seq, dtype=torch.int64, device=device).repeat(B)
        self.positions = self.pad_positions.clone()
        self.page_table = torch.zeros(B, self.max_pages, **i32)
        self.seq_lens = torch.full((B,), tokens_per_seq, **i32)
        self.query_start = torch.arange(B + 1, **i32) * tokens_per_seq
        self.token_seq = torch.arange(B, **i32).repeat_interleave(tokens_per_seq)

    def context(self, bs: int) -> StepContext:
        n = bs * self.tokens_per_seq
        paged = PagedStep(
            page_table=self.page_table[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start=self.query_start[: bs + 1],
            token_seq=self.token_seq[:n],
            max_context=self.max_context,
            max_new=self.tokens_per_seq,
        )
        # The per-sequence list is never read on a paged decode path; it only carries the batch shape.
        seqs = [SequenceStep(num_cached=0, num_new=self.tokens_per_seq, kv=None) for _ in range(bs)]
        return StepContext(positions=self.positions[:n], seqs=seqs, paged=paged)

    def fill(self, bs: int, input_ids: torch.Tensor, ctx: StepContext) -> int:
        """Copy a step of len(ctx.seqs) <= bs sequences into the buffers, rows past it padded -> its token count."""
        assert ctx.paged is not None
        n_seqs = len(ctx.seqs)
        n, padded = n_seqs * self.tokens_per_seq, bs * self.tokens_per_seq
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(ctx.positions, non_blocking=True)
        width = ctx.paged.page_table.shape[1]
        self.page_table[:bs].zero_()
        self.page_table[:n_seqs, :width].copy_(ctx.paged.page_table, non_blocking=True)
        self.seq_lens[:n_seqs].copy_(ctx.paged.seq_lens, non_blocking=True)
        if padded > n:
            self.input_ids[n:padded].zero_()
            self.positions[n:padded].copy_(self.pad_positions[n:padded])
            self.seq_lens[n_seqs:bs].fill_(self.tokens_per_seq)
        return n


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: Any,
        moe: Any,
        device: torch.device,
        max_batch: int,
        tokens_per_seq: int,
        max_context: int,
        page_size: int,
        batch_sizes: list[int] | None = None,
        warmup_runs: int = 2,
        compiled: CompiledDecode | None = None,
    ) -> None:
        """`compiled`: capture the torch.compile'd layers (compiled in the warm-up runs) instead of the eager ones."""
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        ok, why = graph_capable(backend, moe)
        if not ok:
            raise ValueError(f"cannot capture decode graphs: {why}")
        self.model, self.backend, self.moe, self.device = model, backend, moe, device
        self.tokens_per_seq, self.max_context, self.page_size = tokens_per_seq, max_context, page_size
        self.batch_sizes = sorted(batch_sizes or bucket_sizes(max_batch))
        self.max_batch = self.batch_sizes[-1]
        self.warmup_runs = warmup_runs
        self.compiled = compiled
        self.static = StaticDecodeInputs(device, self.max_batch, tokens_per_seq, max_context, page_size)
        self.max_pages = self.static.max_pages
        self.contexts: dict[int, StepContext] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool: Any = None

    def _forward(self, n: int, ctx: StepContext) -> torch.Tensor:
        input_ids = self.static.input_ids[:n]
        if self.compiled is not None:
            return self.compiled(self.model, input_ids, ctx, self.backend, self.moe)
        return self.model(input_ids, ctx, self.backend, self.moe)

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first, so smaller graphs reuse the pool blocks the largest one allocated.
        for bs in reversed(self.batch_sizes):
            n = bs * self.tokens_per_seq
            ctx = self.contexts[bs] = self.static.context(bs)
            for _ in range(self.warmup_runs):  # compiles kernels and settles allocations outside the capture
                ctx.paged.derived.clear()  # type: ignore[union-attr]
                self._forward(n, ctx)
            torch.cuda.synchronize(self.device)
            ctx.paged.derived.clear()  # type: ignore[union-attr]  # recomputed inside the graph, from the buffers
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(n, ctx)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs], self.outputs[bs] = graph, out
        torch.cuda.synchronize(self.device)
        log.info(
            "captured decode CUDA graphs for batch sizes %s (%d tokens per sequence, contexts <= %d, %s layers)",
            self.batch_sizes,
            self.tokens_per_seq,
            self.max_context,
            "compiled" if self.compiled is not None else "eager",
        )

    def bucket(self, num_seqs: int) -> int | None:
        for b in self.batch_sizes:
            if b >= num_seqs:
                return b
        return None

    def covers(self, ctx: StepContext) -> int | None:
        """The bucket that replays this step, or None when no captured graph fits it."""
        if not self.graphs or ctx.paged is None or any(s.num_new != self.tokens_per_seq for s in ctx.seqs):
            return None
        if ctx.paged.max_context > self.max_context or ctx.paged.page_table.shape[1] > self.max_pages:
            return None
        return self.bucket(len(ctx.seqs))

    def run(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Replay for this step, or None when it is not a decode step a captured graph covers."""
        bs = self.covers(ctx)
        return None if bs is None else self._replay(bs, input_ids, ctx)

    def _replay(self, bs: int, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n = self.static.fill(bs, input_ids, ctx)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]

    @torch.inference_mode()
    def check_against_eager(self, input_ids: torch.Tensor, ctx: StepContext, rtol: float = 1e-2) -> str | None:
        """Replay `ctx` and run the same static context eagerly; None if they agree, else what differs."""
        bs = self.covers(ctx)
        if bs is None:
            return "the check step is not covered by any captured graph"
        graph_out = self._replay(bs, input_ids, ctx).clone()
        static = self.contexts[bs]
        static.paged.derived.clear()  # type: ignore[union-attr]
        n = len(ctx.seqs) * self.tokens_per_seq
        eager = self.model(self.static.input_ids[: bs * self.tokens_per_seq], static, self.backend, self.moe)[:n]
        err = ((graph_out.float() - eager.float()).abs().max() / eager.float().abs().max().clamp_min(1e-6)).item()
        return None if err <= rtol else f"graph replay differs from eager by {err:.3g} (relative max)"


def capture_decode_graphs(
    model: torch.nn.Module, backend: Any, moe: Any, device: torch.device, config: EngineConfig, max_model_len: int
) -> DecodeGraphs | None:
    """Capture the engine's decode graphs as its config sizes them; None (the reason logged) where it cannot."""
    ok, why = graph_capable(backend, moe)
    if not ok:
        log.warning("CUDA graphs off: %s", why)
        return None
    max_context = min(config.graph_max_context, max_model_len)
    threshold = getattr(backend, "dense_threshold", 0)
    if config.spec_steps and max_context <= threshold:
        # Several tokens per sequence within the dense threshold take the dense prefill path, which
        # reads host lengths: verify graphs must be captured on the (exact) selection path instead.
        max_context = threshold + 1

    def capture(compiled: CompiledDecode | None) -> DecodeGraphs:
        graphs = DecodeGraphs(
            model,
            backend,
            moe,
            device,
            max_batch=min(config.graph_max_batch, config.max_running),
            tokens_per_seq=1 + config.spec_steps,
            max_context=max_context,
            page_size=config.page_size,
            compiled=compiled,
        )
        graphs.capture()
        return graphs

    if config.compile_decode:
        try:
            return capture(CompiledDecode())
        except Exception as e:
            log.warning("compiled decode off, capturing the eager layers: %s", describe_failure(e), exc_info=True)
            torch.cuda.synchronize(device)
    return capture(None)
