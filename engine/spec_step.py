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
# Stops a sequence whose logits were not finite with an error and returns its output.
Fault = Callable[[Sequence], RequestOutput]
# id(item) -> (tokens, their logprobs, whether its logits were not finite)
Sampled = dict[int, tuple[list[int], list[TokenLogprobs], bool]]


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

    def run(self, batch: Batch, times: StepTimes, commit: Commit, fault: Fault) -> list[RequestOutput]:
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
        sampled: Sampled = {}
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
            tokens, logprobs, bad = sampled.get(id(it), ([], [], False))
            if bad:  # no token of this step is a model output: the request stops, nothing is committed or drafted
                outputs.append(fault(seq))
                continue
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

    def _sample_plain(self, hidden: torch.Tensor, plain: list[tuple[ScheduledSeq, int]]) -> Sampled:
        last_rows = [row for _, row in plain]
        h = hidden if len(last_rows) == hidden.shape[0] else hidden[self.runner.index(last_rows)]
        t = SamplingTensors.build([sampling_row(it.seq, []) for it, _ in plain], self.vocab_size, self.device)
        res = self.sampler(self.runner.logits(h), t)
        flags = res.nonfinite if res.nonfinite is not None else torch.zeros_like(res.token_ids, dtype=torch.bool)
        tokens, bad = torch.stack([res.token_ids, flags.to(res.token_ids.dtype)]).tolist()  # one host read
        lps = logprob_rows(res, [it.seq.sampling.logprobs for it, _ in plain])
        return {id(it): ([tok], [lp] if lp else [], bool(f)) for (it, _), tok, lp, f in zip(plain, tokens, lps, bad)}

    def _verify(self, hidden: torch.Tensor, verify: list[tuple[ScheduledSeq, int]]) -> Sampled:
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
        for (it, _), n, final, bad in zip(verify, res.num_accepted, res.final_token, res.nonfinite):
            tokens = [*it.seq.draft_token_ids[:n], final]
            out[id(it)] = (tokens, [lp for lp in lp_rows[first : first + n + 1] if lp is not None], bad)
            first += it.num_new
        return out
