"""Messages between the daemon and an engine worker (ZMQ ipc, msgspec msgpack; never pickle).

This module imports only msgspec (and the msgspec-only client protocol, whose `SamplingParams` requests carry
here too), so the daemon can use it without importing torch. Each direction
has one tagged union; a frame is one encoded message. Token ids, never text, cross this boundary:
tokenisation, detokenisation and stop strings are the daemon's (it holds the text), so the engine
learns of a stop string through an `Abort` with reason "stop".
"""

from __future__ import annotations

from typing import Literal

import msgspec

# The one declaration of sampling, shared with clients and the daemon; engine modules import both from here.
from moed.client.protocol import SamplingParams, check_sampling  # noqa: F401
from moed.engine.config import ResolvedMissService

PROTOCOL_VERSION = 1

FinishReason = Literal["stop", "length", "abort", "error"]


# daemon -> worker


class AddRequest(msgspec.Struct, tag="add", forbid_unknown_fields=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams


class Abort(msgspec.Struct, tag="abort", forbid_unknown_fields=True):
    request_ids: list[str]
    reason: FinishReason = "abort"


class GetStats(msgspec.Struct, tag="get_stats", forbid_unknown_fields=True):
    pass


class Placement(msgspec.Struct, tag="placement", forbid_unknown_fields=True):
    op: Literal["get", "pin", "unpin", "reset", "set"]
    layer: int | None = None
    expert: int | None = None
    token: int = 0  # echoed in the reply so the daemon can match it
    pins: dict[str, list[int]] | None = None  # op "set": each named layer's whole pin set, applied together


class Shutdown(msgspec.Struct, tag="shutdown", forbid_unknown_fields=True):
    pass


ToWorker = AddRequest | Abort | GetStats | Placement | Shutdown


# worker -> daemon


class TokenLogprobs(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    queue_s: float | None = None  # with a request's first tokens: worker arrival -> first scheduled


class StepOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[RequestOutput]
    step_time_s: float


class LayerExpertStats(msgspec.Struct, array_like=True):
    layer: int
    hits: int
    misses: int
    bytes_copied: int
    bytes_cpu: int
    evictions: int
    stall_s: float
    cpu_experts: int


class EngineStats(msgspec.Struct, tag="stats"):
    running: int
    waiting: int
    kv_usage: float  # 0..1
    num_steps: int
    prompt_tokens: int  # cumulative
    generation_tokens: int  # cumulative
    preemptions: int  # cumulative
    step_time_s: dict[str, float] = {}  # breakdown of the last window (e.g. "forward", "sample", "schedule")
    spec_draft_tokens: int = 0  # cumulative
    spec_accepted_tokens: int = 0  # cumulative
    experts: list[LayerExpertStats] = []
    expert_counts: dict[str, list[int]] = {}  # layer -> per-expert activation counts since the last stats
    miss_service: ResolvedMissService | Literal[""] = ""  # "" without an expert cache
    miss_service_rates_Bps: dict[str, float] = {}  # "cpu" / "copy": the rates the hybrid split uses (bytes/s)
    numerical_faults: int = 0  # cumulative: requests stopped because their logits were not finite


class PlacementReply(msgspec.Struct, tag="placement_reply"):
    token: int
    ok: bool
    message: str = ""
    pinned: dict[str, list[int]] = {}  # layer -> pinned experts
    slots: dict[str, int] = {}  # layer -> its expert cache's slots (pins must leave one free unless slots == experts)


class WorkerReady(msgspec.Struct, tag="ready"):
    protocol_version: int
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]


class WorkerFatal(msgspec.Struct, tag="fatal"):
    message: str


FromWorker = StepOutputs | EngineStats | PlacementReply | WorkerReady | WorkerFatal

_to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
_from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(frame: bytes) -> ToWorker:
    return _to_worker_decoder.decode(frame)


def decode_from_worker(frame: bytes) -> FromWorker:
    return _from_worker_decoder.decode(frame)
