"""The engine's step with the MTP draft worker, run synchronously: forward -> sample / verify -> commit -> draft.

Rows without drafts (a prompt's last chunk) are sampled plainly; drafted rows are verified (`verify_drafts`).
The engine commits the tokens (stops, counters, outputs) through the callback it passes to `run`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moed.engine.model_runner import ModelRunner
from moed.engine.protocol import RequestOutput, TokenLogprobs
from moed.engine.sampler import (
    Sampler,
    SampleResult,
    SamplingRow,
    SamplingTensors,
    logprob_rows,
    sampling_row,
    with_logprobs,
)
from moed.engine.scheduler import Batch, ScheduledSeq
from moed.engine.sequence import Sequence
from moed.engine.spec_decode import DraftInput, MTPDrafter, truncate_kv, verify_drafts
from moed.engine.step_times import StepTimes

# Appends a sequence's sampled tokens (stops applied) and returns its output.
Commit = Callable[[Sequence, list[int], list[TokenLogprobs]], RequestOutput]


class SpecStep:
    def __init__(
        self, runner: ModelRunner, sampler: Sampler, drafter: MTPDrafter, vocab_size: int, device: torch.device
    ) -> None:
        self.runner = runner
        self.sampler = sampler
        self.drafter = drafter
        self.vocab_size = vocab_size
        self.device = device
        self.draft_tokens = 0  # drafts verified
        self.accepted_tokens = 0  # of which the target kept

    def run(self, batch: Batch, times: StepTimes, commit: Commit) -> list[RequestOutput]:
        """Verify, commit, draft the next tokens."""
        host = self.runner.prepare(batch.items)
        times.lap("prepare")
        hidden = self.runner.run(*self.runner.upload(host))
        times.lap("launch")

        plain: list[tuple[ScheduledSeq, int]] = []  # (item, row in hidden)
        verify: list[tuple[ScheduledSeq, int]] = []  # (item, first row in hidden)
        off = 0
        for it in batch.items:
            if it.samples:
                (verify if it.num_draft else plain).append((it, off if it.num_draft else off + it.num_new - 1))
            off += it.num_new
        sampled: dict[int, tuple[list[int], list[TokenLogprobs]]] = {}  # id(item) -> (tokens, logprobs)
        if plain:
            sampled.update(self._sample_plain(hidden, plain))
        if verify:
            sampled.update(self._verify(hidden, verify))
        times.lap("sample")

        outputs: list[RequestOutput] = []
        drafts: list[DraftInput] = []
        off = 0
        for it in batch.items:
            seq, start, first_row = it.seq, it.seq.num_computed, off
            off += it.num_new
            tokens, logprobs = sampled.get(id(it), ([], []))
            committed = it.num_prompt_chunk + (len(tokens) - 1 if it.num_draft else 0)
            seq.num_computed += committed
            if it.num_draft:
                self.draft_tokens += it.num_draft
                self.accepted_tokens += len(tokens) - 1
                truncate_kv(seq.kv, seq.num_computed)
            seq.draft_token_ids, seq.draft_probs = [], None
            if tokens:
                outputs.append(commit(seq, tokens, logprobs))
            if not seq.is_finished:
                # Propose only after a sampled token, never after a prompt chunk that happens to leave one
                # token: so the first output token always comes from plain sampling, whatever the chunking,
                # and a seeded request draws the same noise alone or in any batch.
                drafts.append(DraftInput(seq, start, hidden[first_row : first_row + committed], bool(tokens)))
        times.lap("commit")
        self.drafter.run(drafts)
        times.lap("draft")
        return outputs

    def _sample_plain(
        self, hidden: torch.Tensor, plain: list[tuple[ScheduledSeq, int]]
    ) -> dict[int, tuple[list[int], list[TokenLogprobs]]]:
        last_rows = [row for _, row in plain]
        h = hidden if len(last_rows) == hidden.shape[0] else hidden[self.runner.index(last_rows)]
        t = SamplingTensors.build([sampling_row(it.seq, []) for it, _ in plain], self.vocab_size, self.device)
        res = self.sampler(self.runner.logits(h), t)
        tokens = res.token_ids.tolist()
        lps = logprob_rows(res, [it.seq.sampling.logprobs for it, _ in plain])
        return {id(it): ([tok], [lp] if lp else []) for (it, _), tok, lp in zip(plain, tokens, lps)}

    def _verify(
        self, hidden: torch.Tensor, verify: list[tuple[ScheduledSeq, int]]
    ) -> dict[int, tuple[list[int], list[TokenLogprobs]]]:
        rows_idx: list[int] = []
        rows: list[SamplingRow] = []
        for it, first in verify:
            rows_idx += range(first, first + it.num_new)
            drafts = it.seq.draft_token_ids[: it.num_draft]
            rows += [sampling_row(it.seq, drafts[:i]) for i in range(it.num_new)]
        logits = self.runner.logits(hidden[self.runner.index(rows_idx)])
        t = SamplingTensors.build(rows, self.vocab_size, self.device)
        seqs = [it.seq for it, _ in verify]
        res = verify_drafts(
            self.sampler,
            logits,
            t,
            [it.num_draft for it, _ in verify],
            [s.draft_token_ids[: it.num_draft] for s, (it, _) in zip(seqs, verify)],
            [s.draft_probs for s in seqs],
            [s.sampling.temperature <= 0 for s in seqs],
        )
        lp_rows = logprob_rows(
            with_logprobs(SampleResult(res.row_tokens), logits, t.max_logprobs), [r.params.logprobs for r in rows]
        )
        out = {}
        first = 0
        for (it, _), n, final in zip(verify, res.num_accepted, res.final_token):
            tokens = [*it.seq.draft_token_ids[:n], final]
            out[id(it)] = (tokens, [lp for lp in lp_rows[first : first + n + 1] if lp is not None])
            first += it.num_new
        return out
