"""Continuous batching: which sequences run in the next step, with how many tokens each.

Policy, per step, under a token budget (`max_tokens_per_step`):
1. Running sequences in decode go first, oldest arrival first: each feeds its last sampled token
   plus its pending draft tokens (speculative decoding).
2. Running sequences still in prefill continue with a chunk of at most the budget left (chunked
   prefill), oldest first.
3. Waiting sequences are admitted in arrival order (FCFS; the queue head blocks those behind it)
   while fewer than `max_running` run, budget is left, and the KV pool has free pages for their
   first chunk. Admission never preempts.
When a running sequence needs a page and none is free, the running sequence that arrived last is
preempted by recompute (its pages and cache dropped, its tokens kept, put back at the head of the
queue); if that is the sequence itself, it waits. The oldest sequence therefore always progresses,
and `max_seq_len` (no more than the pool holds) guarantees a lone sequence fits.

Pages reserved per step: a prefill chunk's positions; a decode step's `1 + k` verified positions plus
the `k - 1` the draft worker writes after it (k = speculative tokens), so `max(1, 2k)` ahead.

Stops: max_tokens, max_seq_len, stop token ids, and EOS unless `ignore_eos`; a stop token is kept in
the output. Stop STRINGS are not checked here: the daemon holds the text (tokenisation and
incremental detokenisation are its job), finds stop strings there, including ones that span token
boundaries, and sends `Abort(reason="stop")`, which frees the sequence like any abort.

Overlapped steps (sequence.py): step n + 1 is scheduled before step n's tokens are read back, so
decoding sequences carry one pending token. A sequence whose pending tokens already reach
max_tokens or max_seq_len is not scheduled again (it finishes when they resolve, whatever their
values); one that resolves to a stop token or is aborted may already be in the step in flight: that
step's token for it is discarded (`finish` drops trailing placeholders) and its pages are freed at
once. Freeing is safe while the GPU still writes them: every step runs on one stream, so a later
owner's writes land after the in-flight step's. A sequence preempted while it has a pending token
is not re-admitted until the token resolves (its recompute needs the value); it blocks the queue
head for that one step.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable

from moed.engine.kv_pages import KVPages
from moed.engine.protocol import FinishReason
from moed.engine.sequence import Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 256
    max_tokens_per_step: int = 2048
    num_spec_tokens: int = 0  # draft tokens verified per decode step (0: no speculative decoding)
    max_model_len: int = 4096  # longest sequence (prompt + output) the model serves

    def __post_init__(self) -> None:
        if self.max_running <= 0:
            raise ValueError(f"max_running must be positive, got {self.max_running}")
        if self.num_spec_tokens < 0:
            raise ValueError(f"num_spec_tokens (spec steps) must be >= 0, got {self.num_spec_tokens}")
        need = self.max_running * (1 + self.num_spec_tokens)
        if self.max_tokens_per_step < need:
            raise ValueError(
                f"max_tokens_per_step={self.max_tokens_per_step} is below max_running * (1 + spec "
                f"steps) = {need}: every running sequence must be able to decode in each step"
            )

    @property
    def decode_lookahead(self) -> int:
        k = self.num_spec_tokens
        return max(1, 2 * k)


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_prompt_chunk: int  # tokens of `token_ids[num_computed:]` fed this step
    num_draft: int  # draft tokens fed after them (verified this step)

    @property
    def num_new(self) -> int:
        return self.num_prompt_chunk + self.num_draft

    @property
    def samples(self) -> bool:
        """True when this step caches the whole token list, so the step ends with a sampled token."""
        return self.seq.num_computed + self.num_prompt_chunk == self.seq.num_tokens

    def input_token_ids(self) -> list[int]:
        s = self.seq
        return (
            s.token_ids[s.num_computed : s.num_computed + self.num_prompt_chunk] + s.draft_token_ids[: self.num_draft]
        )


@dataclasses.dataclass
class Batch:
    items: list[ScheduledSeq]  # decode (and verify) items first, then prefill chunks
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(it.num_new for it in self.items)

    @property
    def is_decode(self) -> bool:
        return bool(self.items) and all(it.seq.in_decode for it in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVPages, release_cache: Callable[[Sequence], None]) -> None:
        self.config, self.kv = config, kv
        self._release_cache = release_cache  # drops the backends' per-sequence caches
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.by_id: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # The longest a sequence may grow: what the model serves and what a lone sequence can hold.
        self.max_seq_len = min(config.max_model_len, kv.capacity_tokens - config.decode_lookahead)
        if self.max_seq_len < 2:
            raise ValueError(
                f"KV pool of {kv.num_pages} pages x {kv.page_size} tokens is too small for "
                f"a decode lookahead of {config.decode_lookahead} tokens"
            )

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        seq.status = SequenceStatus.WAITING
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> Sequence | None:
        """Finish a request wherever it is; None if unknown (it may have finished already)."""
        seq = self.by_id.get(request_id)
        if seq is not None:
            self.finish(seq, reason)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._drop_state(seq)
        seq.drop_pending()
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.by_id.pop(seq.request_id, None)

    def schedule(self) -> Batch:
        budget = self.config.max_tokens_per_step
        chosen: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        for seq in [s for s in self.running if s.in_decode]:
            if seq.status is not SequenceStatus.RUNNING or self.will_finish(seq):
                continue  # preempted earlier in this loop, or finishes when its pending token resolves
            n = 1 + len(seq.draft_token_ids)
            if n > budget:
                break
            if self._reserve(seq, seq.num_computed + max(n, self.config.decode_lookahead), chosen, preempted):
                chosen.append(ScheduledSeq(seq, 1, n - 1))
                budget -= n

        for seq in [s for s in self.running if not s.in_decode]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            if self._reserve(seq, seq.num_computed + chunk + self._after_prefill(seq, chunk), chosen, preempted):
                chosen.append(ScheduledSeq(seq, chunk, 0))
                budget = self.config.max_tokens_per_step - sum(it.num_new for it in chosen)

        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted while its last token was in flight: recompute needs its value
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            if not self.kv.reserve(seq, seq.num_computed + chunk + self._after_prefill(seq, chunk)):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.queue_s is None:
                seq.queue_s = time.monotonic() - seq.arrived_at
            self._insert_running(seq)
            chosen.append(ScheduledSeq(seq, chunk, 0))
            budget -= chunk

        return Batch(chosen, preempted)

    def _after_prefill(self, seq: Sequence, chunk: int) -> int:
        """Positions the draft worker writes past a prompt chunk that completes the prompt."""
        done = seq.num_computed + chunk == seq.num_tokens
        return max(0, self.config.num_spec_tokens - 1) if done else 0

    def _reserve(self, seq: Sequence, num_tokens: int, chosen: list[ScheduledSeq], preempted: list[Sequence]) -> bool:
        """Pages for `num_tokens` positions of `seq`, preempting the latest arrivals; False if `seq` itself was."""
        while not self.kv.reserve(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            for i, it in enumerate(chosen):
                if it.seq is victim:
                    del chosen[i]
                    break
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._drop_state(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Back in front of every later arrival (the queue stays in arrival order).
        i = 0
        while i < len(self.waiting) and self.waiting[i].arrival < seq.arrival:
            i += 1
        self.waiting.insert(i, seq)

    def _drop_state(self, seq: Sequence) -> None:
        self.kv.release(seq)
        self._release_cache(seq)
        seq.num_computed = 0
        seq.num_draft_computed = 0
        seq.draft_token_ids = []
        seq.draft_probs = None

    def _insert_running(self, seq: Sequence) -> None:
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival > seq.arrival:
            i -= 1
        self.running.insert(i, seq)

    # Stop conditions, checked token by token as the engine appends sampled (or accepted) tokens.

    def append_tokens(self, seq: Sequence, tokens: list[int], eos_token_ids: frozenset[int]) -> int:
        """Append `tokens` to `seq` up to the first stop; returns how many were kept."""
        for i, t in enumerate(tokens):
            seq.token_ids.append(t)
            reason = self._stop_reason(seq, t, seq.num_tokens, eos_token_ids)
            if reason is not None:
                self.finish(seq, reason)
                return i + 1
        return len(tokens)

    def resolve_token(self, seq: Sequence, index: int, token: int, eos_token_ids: frozenset[int]) -> bool:
        """Fill the placeholder at `token_ids[index]` with the token read back; True if that finished `seq`."""
        if seq.num_pending == 0 or index != seq.num_known:
            raise RuntimeError(f"{seq}: token {index} is not its first pending token")
        seq.token_ids[index] = token
        seq.num_pending -= 1
        reason = self._stop_reason(seq, token, index + 1, eos_token_ids)
        if reason is not None:
            self.finish(seq, reason)  # drops the tokens sampled after this one
        return reason is not None

    def will_finish(self, seq: Sequence) -> bool:
        """The pending tokens of `seq` reach its length limits: it stops when they resolve, whatever they are."""
        return seq.num_pending > 0 and (
            seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_seq_len
        )

    def _stop_reason(
        self, seq: Sequence, token: int, length: int, eos_token_ids: frozenset[int]
    ) -> FinishReason | None:
        """Why `seq` stops at `token`, its `length`-th token (prompt included); None if it goes on."""
        sp = seq.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in eos_token_ids):
            return "stop"
        if length - seq.num_prompt_tokens >= sp.max_tokens or length >= self.max_seq_len:
            return "length"
        return None
