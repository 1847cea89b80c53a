"""The whole-model bench's arithmetic: the deployment's expert cache, the bounds, and whole-model figures assembled
from measured parts (moed's and llama.cpp's by the same per-layer method). Pure functions, tested on CPU.

GLM-5.1: 78 layers of which the first 3 are dense, so 75 MoE layers of 256 routed experts.
"""

from __future__ import annotations

import dataclasses

LAYERS = 78
MOE_LAYERS = 75  # GLM-5.1: 78 layers, the first 3 dense
REAL_EXPERTS = 256
BATCHES = (1, 2, 8, 16, 32, 64)
PROMPTS = (1024, 8192, 32768)
CHUNK = 2048  # the engine's default max_tokens_per_step
# The slice stage's MTP verify rows: skewed chains in steps of a token and its draft (1 + 1 tokens per sequence).
VERIFY_TRACE = "skewed-verify"
# MTP acceptance of the first draft token published for the MTP module GLM-5.1 shares with DeepSeek-V3: "the
# acceptance rate of the second token prediction ranges between 85% and 90%" (DeepSeek-V3 Technical Report,
# arXiv:2412.19437, section 5.4.3). Random weights accept nothing, hence also the rows at 0. One draft token: for
# GLM-4.6 a second draft token was reported accepted almost never (vllm-project/vllm issue 25993).
PUBLISHED_MTP_ACCEPTANCE = 0.85
MTP_SOURCE = "DeepSeek-V3 Technical Report (arXiv:2412.19437) sec. 5.4.3: 85-90% for the 1st draft token"


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What one GPU of `gpu_bytes` leaves the routed experts of the whole model (all figures in bytes)."""

    gpu_bytes: int
    nonexpert_bytes: int  # resident non-expert weights (as the engine holds them)
    kv_bytes: int  # KV + index-K for the context the deployment plans for
    reserve_bytes: int  # activations, graph pools, CUDA context
    expert_bytes: int  # one routed expert as stored (FP8 + scales)
    moe_layers: int = MOE_LAYERS
    experts: int = REAL_EXPERTS

    @property
    def cache_bytes(self) -> int:
        return max(0, self.gpu_bytes - self.nonexpert_bytes - self.kv_bytes - self.reserve_bytes)

    @property
    def all_expert_bytes(self) -> int:
        return self.expert_bytes * self.experts * self.moe_layers

    @property
    def fraction(self) -> float:
        return self.cache_bytes / self.all_expert_bytes

    @property
    def slots_per_layer(self) -> int:
        return min(self.experts, self.cache_bytes // (self.expert_bytes * self.moe_layers))


def decode_bound_ms(
    misses: float, hits: float, expert_bytes: int, joint_GBps: float, hbm_GBps: float, nonmoe_ms: float = 0.0
) -> float:
    """DESIGN.md's decode bound: miss bytes / the joint CPU + copy miss-service rate + resident bytes / HBM + the
    measured non-MoE time (per MoE layer, misses and hits per step of that layer)."""
    return 1e3 * (misses * expert_bytes / (joint_GBps * 1e9) + hits * expert_bytes / (hbm_GBps * 1e9)) + nonmoe_ms


def joint_rate_GBps(cpu_GBps: float, copy_GBps: float, host_read_GBps: float) -> float:
    """Misses are served by the CPU and by copies at once until both meet the host-read ceiling."""
    return min(cpu_GBps + copy_GBps, host_read_GBps)


def whole_decode_ms(nonmoe_ms: float, moe_layer_ms: float, moe_layers: int = MOE_LAYERS) -> float:
    return nonmoe_ms + moe_layers * moe_layer_ms


def mtp_tokens_per_s(verify_ms: float, draft_ms: float, acceptance: float, batch: int) -> float:
    """One draft token per sequence: a step verifies it (2 tokens per sequence) and drafts the next one; each
    sequence gains 1 + acceptance tokens per step."""
    return batch * (1.0 + acceptance) / ((verify_ms + draft_ms) / 1e3)


def ttft_s(nonmoe_prefill_s: float, moe_prefill_layer_s: float, moe_layers: int = MOE_LAYERS) -> float:
    return nonmoe_prefill_s + moe_layers * moe_prefill_layer_s


def interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear in x between measured points (flat beyond the ends)."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    hi = next(i for i, v in enumerate(xs) if v >= x)
    a, b = xs[hi - 1], xs[hi]
    return points[a] + (points[b] - points[a]) * (x - a) / (b - a)


def llama_per_layer(
    deep_gpu_ms: float,
    deep_cpu_ms: float,
    slice_gpu_ms: float,
    slice_cpu_ms: float,
    slice_moe_layers: int,
    moe_layers: int = MOE_LAYERS,
    gpu_layers: int = 0,
) -> dict[str, float]:
    """llama.cpp by the same per-layer method as moed: its full-depth all-GPU step (which holds every layer but
    the experts of few) plus 75 x (CPU-experts layer - GPU-experts layer), the difference taken on the 256-expert
    slice; `gpu_layers` of the 75 keep their experts on the GPU (--n-cpu-moe 75 - gpu_layers)."""
    per_layer_cpu_extra = (slice_cpu_ms - slice_gpu_ms) / slice_moe_layers
    return {
        "cpu_extra_per_layer_ms": per_layer_cpu_extra,
        "whole_ms": deep_gpu_ms + (moe_layers - gpu_layers) * per_layer_cpu_extra,
        "deep_direct_cpu_ms": deep_cpu_ms,
    }


def llama_q4_per_layer(
    deep_gpu_q8_ms: float,
    slice_gpu_q4_ms: float,
    slice_cpu_q4_ms: float,
    slice_moe_layers: int,
    slice_gpu_q8_ms: float | None = None,
    slice_layers: int = 3,
    layers: int = LAYERS,
    moe_layers: int = MOE_LAYERS,
    gpu_layers: int = 0,
) -> dict[str, float | None]:
    """llama.cpp Q4_0 by the per-layer method when only the slice was converted to Q4_0: the full-depth all-GPU step
    is the Q8_0 file's, less `layers` x the all-GPU time per layer Q4_0 saves on the slice (slice Q8_0 - slice Q4_0,
    over its `slice_layers` layers; the head, output.weight at Q8_0 in both, cancels), when the Q8_0 slice ran;
    plus (75 - gpu_layers) x the Q4_0 slice's CPU-experts layer - GPU-experts layer."""
    saved = None if slice_gpu_q8_ms is None else (slice_gpu_q8_ms - slice_gpu_q4_ms) / slice_layers
    deep_gpu = deep_gpu_q8_ms - layers * (saved or 0.0)
    per_layer_cpu_extra = (slice_cpu_q4_ms - slice_gpu_q4_ms) / slice_moe_layers
    return {
        "deep_gpu_ms": deep_gpu,
        "gpu_saved_per_layer_ms": saved,
        "cpu_extra_per_layer_ms": per_layer_cpu_extra,
        "whole_ms": deep_gpu + (moe_layers - gpu_layers) * per_layer_cpu_extra,
    }


def llama_gpu_layers(
    gpu_bytes: int,
    nonexpert_bytes: int,
    kv_bytes: int,
    reserve_bytes: int,
    layer_expert_bytes: int,
    moe_layers: int = MOE_LAYERS,
) -> int:
    """How many MoE layers' experts fit the GPU beside llama.cpp's non-expert weights, KV and buffers."""
    free = gpu_bytes - nonexpert_bytes - kv_bytes - reserve_bytes
    return max(0, min(moe_layers, free // layer_expert_bytes))
