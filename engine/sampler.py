"""Batched sampling on the logits' device, and counter-based noise that makes seeds reproduce.

Per row (one row = one position to sample; a verify step has several rows per sequence), in order:
1. penalties on the fp32 logits: repetition (divides positive / multiplies negative logits of
   every token seen in the prompt or output), frequency (minus count in the output) and presence
   (minus 1 if in the output), the conventions of vLLM and sglang;
2. greedy rows (temperature 0) take the argmax of the penalised logits;
3. the others divide by the temperature, keep the top-k, then the top-p nucleus (smallest prefix
   of the sorted distribution reaching p), then drop tokens below min_p times the top probability,
   and renormalise;
4. a token is drawn by the exponential race `argmax(probs / E)`, E ~ Exp(1) per (row, token), which
   samples exactly from `probs` with no cumulative sums and no host sync.
Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits), as vLLM
reports them by default.

Noise is a hash of (seed, output index, stream, token id): the same request with the same seed
draws the same noise whatever else is in the batch, in whatever order, and after preemption
(recomputed tokens keep their output index; see spec_decode for speculation). Requests without a
seed get one drawn at arrival.
The hash is lowbias32 (Wellons) on 32-bit values held in int64 tensors, with multiplications split
into 16-bit halves so nothing overflows int64; uniforms take its top 24 bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

import torch

from moed.engine.protocol import SamplingParams, TokenLogprobs
from moed.engine.sequence import Sequence

# Noise streams: independent draws for the same (seed, output index).
STREAM_SAMPLE, STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 0x5A3C, 0x1F77, 0x6B21, 0x33D9

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), exactly, in int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijection of [0, 2**32) with strong avalanche. x: int64 tensor of 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, out_index: torch.Tensor, stream: int) -> torch.Tensor:
    """seeds: [R] int64 (63-bit), out_index: [R] int64 -> [R] int64 32-bit keys, one per (seed, index, stream)."""
    k = mix32(seeds & _M32)
    k = mix32(k ^ ((seeds >> 32) & _M32))
    return mix32(k ^ mix32((out_index + stream * 0x10001) & _M32))


def uniform_rows(keys: torch.Tensor) -> torch.Tensor:
    """keys: [R] -> one uniform in (0, 1) per row, fp32."""
    return ((mix32(keys ^ 0x2545F491) >> 8).float() + 0.5) * (1.0 / (1 << 24))


class NoiseTable:
    """Per-token hashes, computed once per vocabulary size and device."""

    def __init__(self) -> None:
        self._token_hash: dict[tuple[int, torch.device], torch.Tensor] = {}

    def token_hash(self, vocab: int, device: torch.device) -> torch.Tensor:
        key = (vocab, device)
        h = self._token_hash.get(key)
        if h is None:
            h = self._token_hash[key] = mix32(torch.arange(vocab, device=device, dtype=torch.int64) + 0x3C6EF372)
        return h

    def exponential(self, keys: torch.Tensor, vocab: int) -> torch.Tensor:
        """keys: [R] -> E ~ Exp(1): [R, vocab] fp32, a pure function of (key, token id)."""
        bits = mix32(keys[:, None] ^ self.token_hash(vocab, keys.device)[None, :])
        u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
        return -torch.log(u)


@dataclasses.dataclass
class SamplingRow:
    """One position to sample: the request's parameters and the tokens penalties look at."""

    params: SamplingParams
    seed: int
    out_index: int  # output tokens before the one sampled here (the noise counter)
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]  # tokens generated before this position (drafts included when verifying)


@dataclasses.dataclass
class SamplingTensors:
    """A batch of rows' parameters on the device, plus the host-side flags that pick the work to do."""

    temperature: torch.Tensor  # [R] fp32; 1 where greedy (unused there)
    greedy: torch.Tensor  # [R] bool
    top_k: torch.Tensor  # [R] int64, vocab when off
    top_p: torch.Tensor  # [R] fp32
    min_p: torch.Tensor  # [R] fp32
    repetition: torch.Tensor  # [R] fp32
    frequency: torch.Tensor  # [R] fp32
    presence: torch.Tensor  # [R] fp32
    seeds: torch.Tensor  # [R] int64
    out_index: torch.Tensor  # [R] int64
    seen: torch.Tensor | None  # [R, vocab] bool: in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # [R, vocab] fp32 (frequency / presence penalties)
    all_greedy: bool
    max_top_k: int  # 0 when no row uses top-k
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    max_logprobs: int  # -1: no row wants logprobs

    @classmethod
    def build(
        cls, rows: Seq[SamplingRow], vocab: int, device: torch.device, pending_output: torch.Tensor | None = None
    ) -> SamplingTensors:
        """`pending_output`: [R] int64 on the device, each row's last output token when it is still being
        sampled by the step in flight (overlapped steps; `vocab` where none), counted by the penalties."""
        ps = [r.params for r in rows]
        greedy = [p.temperature <= 0.0 for p in ps]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
        rep = [p.repetition_penalty for p in ps]
        freq = [p.frequency_penalty for p in ps]
        pres = [p.presence_penalty for p in ps]

        any_rep = any(r != 1.0 for r in rep)
        any_freq = any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres)
        seen = counts = None
        if any_rep or any_freq:
            seen, counts = _token_tables(rows, vocab, device, any_rep, pending_output)
        # Two uploads per step: every float parameter in one tensor, every integer one in another.
        floats = _upload(
            [
                [1.0 if g else p.temperature for g, p in zip(greedy, ps)],
                [p.top_p for p in ps],
                [p.min_p for p in ps],
                rep,
                freq,
                pres,
                [float(g) for g in greedy],
            ],
            torch.float32,
            device,
        )
        ints = _upload([top_k, [r.seed for r in rows], [r.out_index for r in rows]], torch.int64, device)
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            min_p=floats[2],
            repetition=floats[3],
            frequency=floats[4],
            presence=floats[5],
            greedy=floats[6] > 0,
            top_k=ints[0],
            seeds=ints[1],
            out_index=ints[2],
            seen=seen,
            output_counts=counts,
            all_greedy=all(greedy),
            max_top_k=max((k for k, g in zip(top_k, greedy) if k < vocab and not g), default=0),
            any_top_p=any(p.top_p < 1.0 for p, g in zip(ps, greedy) if not g),
            any_min_p=any(p.min_p > 0.0 for p, g in zip(ps, greedy) if not g),
            any_penalty=any_rep or any_freq,
            max_logprobs=max((p.logprobs for p in ps if p.logprobs is not None), default=-1),
        )


def _upload(values: list[list], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """From pinned memory without blocking the host (a pageable copy would wait for the device)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_tables(
    rows: Seq[SamplingRow], vocab: int, device: torch.device, need_seen: bool, pending_output: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Output token counts [R, vocab] and the prompt-or-output mask, by scatter from padded id lists."""
    R = len(rows)
    width = max(1, max(len(r.output_token_ids) for r in rows))
    out = torch.full((R, width), vocab, dtype=torch.int64)  # padding scatters into a spare column
    for i, r in enumerate(rows):
        if r.output_token_ids:
            out[i, : len(r.output_token_ids)] = torch.as_tensor(list(r.output_token_ids), dtype=torch.int64)
    out = _to_device(out, device)
    if pending_output is not None:
        out = torch.cat([out, pending_output[:, None]], dim=1)
    counts = torch.zeros(R, vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, out, torch.ones_like(out, dtype=torch.float32))
    counts = counts[:, :vocab]
    seen = None
    if need_seen:
        pw = max(1, max(len(r.prompt_token_ids) for r in rows))
        prompt = torch.full((R, pw), vocab, dtype=torch.int64)
        for i, r in enumerate(rows):
            prompt[i, : len(r.prompt_token_ids)] = torch.as_tensor(list(r.prompt_token_ids), dtype=torch.int64)
        seen_full = torch.zeros(R, vocab + 1, dtype=torch.bool, device=device)
        seen_full.scatter_(1, _to_device(prompt, device), True)
        seen = seen_full[:, :vocab] | (counts > 0)
    return seen, counts


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits: [R, vocab] fp32 -> penalised copy (or the same tensor when no row has a penalty)."""
    if not t.any_penalty:
        return logits
    logits = logits.clone()
    if t.seen is not None:
        rep = t.repetition[:, None]
        logits = torch.where(t.seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if t.output_counts is not None:
        logits = logits - t.frequency[:, None] * t.output_counts
        logits = logits - t.presence[:, None] * (t.output_counts > 0).float()
    return logits


def sampling_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Penalised logits [R, vocab] -> the distribution random rows sample from (rows sum to 1)."""
    scaled = logits / t.temperature[:, None]
    vocab = scaled.shape[-1]
    if t.any_top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        drop = torch.arange(vocab, device=scaled.device)[None, :] >= t.top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop |= ((probs.cumsum(dim=-1) - probs) >= t.top_p[:, None]) & (t.top_p[:, None] < 1.0)
        scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    elif t.max_top_k:
        kth = scaled.topk(t.max_top_k, dim=-1).values  # [R, max_top_k], descending
        k_idx = (t.top_k.clamp(max=t.max_top_k) - 1)[:, None]
        threshold = torch.where(
            t.top_k[:, None] >= vocab, torch.full_like(kth[:, :1], float("-inf")), kth.gather(1, k_idx)
        )
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if t.any_min_p:
        probs = probs.masked_fill(probs < t.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclasses.dataclass
class SampleResult:
    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None = None  # [R] fp32, the chosen token's raw logprob
    top_ids: torch.Tensor | None = None  # [R, n] int64
    top_logprobs: torch.Tensor | None = None  # [R, n] fp32
    # [R] bool: the row's raw logits held a NaN or an infinity, so its token is no model output (a numerical fault)
    nonfinite: torch.Tensor | None = None


class Sampler:
    def __init__(self) -> None:
        self.noise = NoiseTable()

    def race(self, probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Exponential race: probs [R, vocab], keys [R] -> one token per row drawn from probs."""
        return (probs / self.noise.exponential(keys, probs.shape[-1])).argmax(dim=-1)

    def sample(
        self, logits: torch.Tensor, t: SamplingTensors, stream: int = STREAM_SAMPLE
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits: [R, vocab] fp32 -> (tokens [R] int64, the probabilities random rows used, or None)."""
        penalised = apply_penalties(logits, t)
        greedy_tokens = penalised.argmax(dim=-1)
        if t.all_greedy:
            return greedy_tokens, None
        probs = sampling_probs(penalised, t)
        drawn = self.race(probs, row_keys(t.seeds, t.out_index, stream))
        return torch.where(t.greedy, greedy_tokens, drawn), probs

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SampleResult:
        logits = logits.float()
        tokens, _ = self.sample(logits, t)
        return with_logprobs(SampleResult(tokens, nonfinite=nonfinite_rows(logits)), logits, t.max_logprobs)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[R] bool: rows of raw logits with a NaN or an infinity (argmax over them returns an id, not a model output)."""
    return ~torch.isfinite(logits).all(dim=-1)


def with_logprobs(result: SampleResult, raw_logits: torch.Tensor, max_logprobs: int) -> SampleResult:
    """Fill the chosen tokens' raw logprobs and the top `max_logprobs` (when any row asked)."""
    if max_logprobs < 0:
        return result
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    result.logprobs = lp.gather(1, result.token_ids[:, None])[:, 0]
    if max_logprobs > 0:
        result.top_logprobs, result.top_ids = lp.topk(min(max_logprobs, lp.shape[-1]), dim=-1)
    return result


def sampling_row(seq: Sequence, drafts: list[int]) -> SamplingRow:
    """The next token's sampling row; its noise index counts pending tokens, its penalties only known ones."""
    out = seq.known_output_ids
    return SamplingRow(
        seq.sampling,
        seq.seed,
        seq.num_output_tokens + len(drafts),
        seq.prompt_token_ids,
        out + drafts if drafts else out,
    )


def logprob_rows(res: SampleResult, wanted: list[int | None]) -> list[TokenLogprobs | None]:
    """Per row: the chosen token's logprobs when the row's request asked for them, else None."""
    if res.logprobs is None:
        return [None for _ in wanted]
    tokens, lps = res.token_ids.tolist(), res.logprobs.tolist()
    top_ids = res.top_ids.tolist() if res.top_ids is not None else None
    top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
    out = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        top = [(top_ids[i][j], top_lps[i][j]) for j in range(n)] if n and top_ids and top_lps else []
        out.append(TokenLogprobs(token_id=tokens[i], logprob=lps[i], top=top))
    return out
