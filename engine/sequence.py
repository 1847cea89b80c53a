"""One request's state inside the engine: its tokens, how much of them the KV cache holds, its pages.

A sequence's tokens are `prompt + output` in one list. `num_computed` counts the leading tokens
whose keys and values are in the cache; a step feeds `token_ids[num_computed:]` (a prefill chunk, or
the one token sampled last) plus, with speculative decoding, the draft tokens awaiting verification, which are
never in `token_ids` until the target accepts them. Preemption by recompute only resets
`num_computed` to 0 and drops the cache: the generated tokens stay, so re-admission prefills
prompt and output together and continues exactly where it stopped.

Overlapped steps (the engine reads sampled tokens back one step late): when a step that samples is
launched, the sequence's `num_computed` advances and a `PENDING` placeholder is appended to
`token_ids` for the token the GPU is still drawing; the next step may already feed it (from the
device). Placeholders are always the trailing `num_pending` entries and are filled in order when
the step is read back, or dropped when the sequence finishes first (its later tokens are discarded).
`num_known` counts the tokens the host knows; outputs and penalties use only those.
"""

from __future__ import annotations

import enum
import time
from typing import Any

import torch

from moed.engine.protocol import FinishReason, RequestOutput, SamplingParams, TokenLogprobs

PENDING = -1  # token_ids entry of a token sampled on the device and not read back yet


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again; holds no pages
    RUNNING = "running"  # holds pages; its tokens are (being) computed
    FINISHED = "finished"  # pages released; nothing more will be computed


class Sequence:
    def __init__(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, seed: int, arrival: int
    ) -> None:
        self.request_id = request_id
        self.sampling = sampling
        self.seed = seed  # the sampling noise key: the request's seed, or one drawn at arrival
        self.arrival = arrival  # FCFS order; kept across preemption so a preempted request goes back first
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.pages: list[int] = []  # KV page ids, in position order (page i holds positions [i*P, (i+1)*P))
        self.kv: Any = None  # the attention backend's per-sequence handle (target model)
        self.draft_kv: Any = None  # the MTP draft worker's handle
        self.num_draft_computed = 0  # positions the draft's cache holds that were built from target hiddens
        self.draft_token_ids: list[int] = []  # proposed by the draft worker, to be verified next step
        self.draft_probs: torch.Tensor | None = None  # [len(draft_token_ids), vocab] when sampling randomly
        self.num_sent = 0  # output tokens already handed to the caller
        self.pending_logprobs: list[TokenLogprobs] = []
        self.num_preemptions = 0
        self.num_pending = 0  # trailing PENDING placeholders in token_ids
        self.arrived_at = time.monotonic()
        self.queue_s: float | None = None  # arrival -> first scheduled, reported once (RequestOutput.queue_s)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known(self) -> int:
        """Tokens whose values the host has (all but the trailing placeholders)."""
        return len(self.token_ids) - self.num_pending

    @property
    def known_output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : self.num_known]

    def drop_pending(self) -> None:
        """Forget the tokens still being sampled (the sequence finished before they were read back)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
            self.num_pending = 0

    def take_output(self, error: str | None = None) -> RequestOutput:
        """The tokens (and logprobs) not sent yet, as this request's next output; marks them sent."""
        known = self.num_known  # tokens still being sampled are sent once read back
        new = self.token_ids[self.num_prompt_tokens + self.num_sent : known]
        self.num_sent = known - self.num_prompt_tokens
        logprobs = None
        if self.sampling.logprobs is not None and self.pending_logprobs:
            logprobs, self.pending_logprobs = self.pending_logprobs, []
        queue_s = None
        if new and self.num_sent == len(new):  # the first output tokens: the engine queue time goes with them
            queue_s = self.queue_s
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=new,
            finish_reason=self.finish_reason,
            logprobs=logprobs,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=known - self.num_prompt_tokens,
            error=error,
            queue_s=queue_s,
        )

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_decode(self) -> bool:
        """Everything but the last sampled token is cached: the next step is a decode (or verify) step."""
        return self.num_tokens - self.num_computed == 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed}, pending={self.num_pending}, pages={len(self.pages)})"
        )
