"""Speculative decoding with GLM-5.1's MTP (NextN) layer, EAGLE-style: the draft worker and the verifier.

Draft worker (`MTPDrafter`): the MTP layer is a decoder layer with its own attention backend
instance, KV caches and MoE runner (its own offload state: it never touches the target's cache
or pins). Its cache entry at position p is built from the target's final-normed hidden state at p
and the token at p + 1, and predicts the token at p + 2. After every target step the worker
*extends* its cache over the positions the target just committed (truncating first whatever its
previous drafts wrote past them), which yields the first draft from the last position; then
`num_steps - 1` single-token steps feed each draft back with the MTP layer's own hidden state.
Positions written: the committed ones, plus `k - 1` past them, which the scheduler reserved.

Verifier (`verify_drafts`): the target runs `[last token, d_1 .. d_k]` in one step and its logits
at those k + 1 positions decide. Greedy rows accept drafts while each equals the target's argmax
of its (penalised) logits and then emit that argmax: the output is identical to plain greedy
decoding. Random rows use rejection sampling: draft d_i drawn from q_i is kept with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from max(0, p_i - q_i)
normalised, and when all k are kept a bonus token from p_k, so every token is distributed exactly
as the target's sampling distribution p (any q is allowed: drafts apply penalties to the
committed output only). Uniforms and draws use the request's counter-based noise (streams
`STREAM_DRAFT`, `STREAM_ACCEPT`, `STREAM_RESIDUAL`), so a seeded request draws the same tokens
alone or in any batch. Drafting starts only after a sampled token (never after a prompt chunk), so
chunking does not change which draw a token comes from; a preemption does (the recomputed prefill
samples plainly a token that would have been verified), so after one the tokens are distributed
the same but not identical. Greedy output is identical in every case.
"""

from __future__ import annotations

import dataclasses

import torch

from moed.attention.paged_kv import is_paged
from moed.engine.model_runner import build_paged_step, new_cache
from moed.engine.sampler import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    Sampler,
    SamplingRow,
    SamplingTensors,
    apply_penalties,
    nonfinite_rows,
    row_keys,
    sampling_probs,
    uniform_rows,
)
from moed.engine.sequence import Sequence
from moed.model.attention_interface import AttentionBackend, SequenceStep, StepContext
from moed.model.glm import GlmMoeDsaForCausalLM
from moed.model.moe import MoERunner


@dataclasses.dataclass
class DraftInput:
    seq: Sequence
    start: int  # first position the target committed this step
    hidden: torch.Tensor  # [n, hidden_size] target final-normed hidden states at positions start .. start + n - 1
    propose: bool  # the sequence is now decoding: draft its next tokens


class MTPDrafter:
    def __init__(
        self,
        model: GlmMoeDsaForCausalLM,
        backend: AttentionBackend,
        moe: MoERunner,
        device: torch.device,
        num_steps: int,
        sampler: Sampler,
    ) -> None:
        if model.cfg.num_nextn_predict_layers < 1:
            raise ValueError(
                f"speculative decoding needs an MTP layer, but {model.cfg.source} has num_nextn_predict_layers = 0"
            )
        if num_steps < 1:
            raise ValueError(f"draft steps must be >= 1, got {num_steps}")
        self.model, self.backend, self.moe, self.device = model, backend, moe, device
        self.num_steps, self.sampler = num_steps, sampler
        self.vocab = model.cfg.vocab_size

    def release(self, seq: Sequence) -> None:
        seq.draft_kv = None

    @torch.inference_mode()
    def run(self, inputs: list[DraftInput]) -> None:
        """Extend the draft caches over the committed positions; set `draft_token_ids` of proposing sequences."""
        if not inputs:
            return
        ids: list[int] = []
        positions: list[int] = []
        steps: list[SequenceStep] = []
        for inp in inputs:
            seq, n = inp.seq, inp.hidden.shape[0]
            if seq.draft_kv is None:
                seq.draft_kv = new_cache(self.backend, seq)
            if seq.num_draft_computed != inp.start:
                raise RuntimeError(
                    f"{seq}: draft cache holds {seq.num_draft_computed} positions, extending from {inp.start}"
                )
            truncate_kv(seq.draft_kv, inp.start)
            ids += seq.token_ids[inp.start + 1 : inp.start + n + 1]
            positions += range(inp.start, inp.start + n)
            steps.append(SequenceStep(num_cached=inp.start, num_new=n, kv=seq.draft_kv))
            seq.num_draft_computed = inp.start + n
        hidden = torch.cat([inp.hidden for inp in inputs], dim=0)
        ctx = self._context(positions, steps, [inp.seq for inp in inputs])
        proposing = [inp for inp in inputs if inp.propose]
        last, base, row = [], [], -1
        for inp, step in zip(inputs, steps):
            row += step.num_new
            if inp.propose:
                last.append(row)
                base.append(step.num_cached + step.num_new)  # the first position past the committed ones
        last_rows = _ints(last, self.device)
        # Logits only at the rows that propose: the rest of a prefill chunk only fills the draft's cache.
        logits, mtp_hidden = self.model.mtp_forward(
            0, _ints(ids, self.device), hidden, ctx, self.backend, self.moe, logit_rows=last_rows
        )
        if not proposing:
            return
        logits, g = logits.float(), mtp_hidden[last_rows]
        seqs = [inp.seq for inp in proposing]
        t = SamplingTensors.build(
            [
                SamplingRow(s.sampling, s.seed, s.num_output_tokens, s.prompt_token_ids, s.output_token_ids)
                for s in seqs
            ],
            self.vocab,
            self.device,
        )
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor | None] = []
        for j in range(self.num_steps):
            tj = dataclasses.replace(t, out_index=t.out_index + j)
            draft, q = self.sampler.sample(logits, tj, STREAM_DRAFT)
            tokens.append(draft)
            probs.append(q)
            if j + 1 < self.num_steps:
                steps = [SequenceStep(num_cached=b + j, num_new=1, kv=s.draft_kv) for s, b in zip(seqs, base)]
                ctx = self._context([b + j for b in base], steps, seqs)
                logits, g = self.model.mtp_forward(0, draft, g, ctx, self.backend, self.moe)
                logits = logits.float()
        drafted = torch.stack(tokens, dim=1).tolist()  # [S, k]; the one host sync of drafting
        for i, seq in enumerate(seqs):
            seq.draft_token_ids = drafted[i]
            random = seq.sampling.temperature > 0 and probs[0] is not None
            seq.draft_probs = torch.stack([q[i] for q in probs], dim=0) if random else None  # type: ignore[index]

    def _context(self, positions: list[int], steps: list[SequenceStep], seqs: list[Sequence]) -> StepContext:
        ctx = StepContext(positions=_ints(positions, self.device), seqs=steps)
        if is_paged(self.backend):  # the draft's own pool, indexed by the target's page lists
            ctx.paged = build_paged_step([s.pages for s in seqs], steps, self.device)
        return ctx


@dataclasses.dataclass
class VerifyResult:
    num_accepted: list[int]  # drafts kept, per sequence
    final_token: list[int]  # the corrected or bonus token, per sequence
    row_tokens: torch.Tensor  # [rows] the token emitted at each verified row (for logprobs)
    nonfinite: list[bool]  # per sequence: a verified row's logits held a NaN or an infinity (a numerical fault)


def verify_drafts(
    sampler: Sampler,
    logits: torch.Tensor,
    t: SamplingTensors,
    num_drafts: list[int],
    drafts: list[list[int]],
    draft_probs: list[torch.Tensor | None],
    greedy: list[bool],
) -> VerifyResult:
    """Accept or reject drafts, all sequences at once.

    logits: [rows, vocab] fp32 raw target logits, sequence s owning `num_drafts[s] + 1` consecutive rows;
    t: the rows' sampling tensors (row i of a sequence sees its output plus d_1 .. d_i);
    draft_probs[s]: [num_drafts[s], vocab], the q the drafts were drawn from (None for greedy sequences).
    """
    device = logits.device
    S, K = len(num_drafts), max(num_drafts)
    if K < 1:
        raise ValueError("verify_drafts needs at least one sequence with drafts (plain rows go to the sampler)")
    offsets = [0]
    for k in num_drafts[:-1]:
        offsets.append(offsets[-1] + k + 1)
    # idx[s, i]: the row of sequence s's i-th verified position; past its own drafts, its last row again.
    idx = torch.tensor([[off + min(i, k) for i in range(K + 1)] for off, k in zip(offsets, num_drafts)], device=device)
    d = torch.tensor([ds + [-1] * (K - len(ds)) for ds in drafts], dtype=torch.int64, device=device).view(S, K)
    valid = torch.arange(K, device=device)[None, :] < torch.tensor(num_drafts, device=device)[:, None]

    penalised = apply_penalties(logits, t)
    target = penalised.argmax(dim=-1)[idx]  # [S, K + 1]
    accept = (d == target[:, :K]) & valid
    final = None
    if not all(greedy):
        probs = sampling_probs(penalised, t)[idx]  # [S, K + 1, vocab]
        q = torch.zeros_like(probs[:, :K])
        for s, qs in enumerate(draft_probs):
            if qs is not None:
                q[s, : qs.shape[0]] = qs
        d_safe = d.clamp(min=0)[..., None]
        p_d = probs[:, :K].gather(2, d_safe)[..., 0]
        q_d = q.gather(2, d_safe)[..., 0]
        seeds, out0 = t.seeds[idx[:, 0]], t.out_index[idx[:, 0]]
        steps = torch.arange(K, device=device)[None, :]
        u = uniform_rows(
            row_keys(seeds[:, None].expand(S, K).reshape(-1), (out0[:, None] + steps).reshape(-1), STREAM_ACCEPT)
        ).view(S, K)
        is_greedy = torch.tensor(greedy, device=device)
        accept = torch.where(is_greedy[:, None], accept, (u * q_d < p_d) & valid)
        n = accept.int().cumprod(dim=1).sum(dim=1)
        rows = torch.arange(S, device=device)
        p_n = probs[rows, n]  # [S, vocab]
        rejected = n < torch.tensor(num_drafts, device=device)
        q_n = torch.where(rejected[:, None], q[rows, n.clamp(max=K - 1)], 0.0)
        residual = (p_n - q_n).clamp(min=0.0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_n)
        drawn = sampler.race(residual, row_keys(seeds, out0 + n, STREAM_RESIDUAL))
        final = torch.where(is_greedy, target[rows, n], drawn)
    else:
        n = accept.int().cumprod(dim=1).sum(dim=1)
        final = target[torch.arange(S, device=device), n]
    i = torch.arange(K + 1, device=device)[None, :]
    chosen = torch.where(i < n[:, None], torch.cat([d, d[:, :1]], dim=1), final[:, None])  # [S, K + 1]
    row_tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=device)
    row_tokens[idx.reshape(-1)] = chosen.reshape(-1)
    bad = nonfinite_rows(logits)[idx].any(dim=1)  # [S]
    host = torch.stack([n, final, bad.to(n.dtype)]).tolist()  # the one host sync of verifying
    return VerifyResult(
        num_accepted=host[0], final_token=host[1], row_tokens=row_tokens, nonfinite=[bool(b) for b in host[2]]
    )


def truncate_kv(kv: object, length: int) -> None:
    truncate = getattr(kv, "truncate", None)
    if truncate is not None:  # paged caches need nothing: positions are overwritten, lengths come from the step
        truncate(length)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device)
