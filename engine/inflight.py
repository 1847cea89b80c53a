"""A launched plain step whose sampled tokens are still on their way to the host (the engine's overlap).

The engine queues step n + 1 before reading step n back: `InFlight` holds what the read-back needs, `to_host`
starts the tokens' copy to pinned memory and `record_event` marks when it is complete.
"""

from __future__ import annotations

import dataclasses

import torch

from moed.engine.model_runner import PendingTokens
from moed.engine.sampler import SampleResult
from moed.engine.sequence import Sequence


@dataclasses.dataclass
class InFlight:
    """A launched plain step whose sampled tokens are not read back yet."""

    samples: list[tuple[Sequence, int]]  # per sampled row: the sequence, the index of its placeholder in token_ids
    pending: PendingTokens  # the rows' tokens on the device: inputs of the next step
    host: SampleResult  # the same tokens (and logprobs) in pinned host memory, complete once `done` fires
    wanted_logprobs: list[int | None]
    done: torch.cuda.Event | None  # recorded after the copies; None off CUDA (the step ran synchronously)

    @property
    def live(self) -> bool:
        return any(not seq.is_finished for seq, _ in self.samples)


def record_event(timing: bool = False) -> torch.cuda.Event:
    """A CUDA event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=timing)
    event.record()
    return event


def to_host(res: SampleResult) -> SampleResult:
    """Start copying a sample result to pinned host memory (complete once an event recorded after it fires)."""
    if res.token_ids.device.type != "cuda":
        return res

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    return SampleResult(
        copy(res.token_ids),
        copy(res.logprobs),
        copy(res.top_ids),  # type: ignore[arg-type]
        copy(res.top_logprobs),
        copy(res.nonfinite),
    )
