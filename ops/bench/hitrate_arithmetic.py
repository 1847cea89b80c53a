"""The hit-rate benchmark's arithmetic: the expert cache a whole GLM-5.1 deployment gets on one GPU, and what the
simulated counts mean for the whole model: expert bytes per accepted token, and what a finer miss split and a
next-layer prefetch could save."""

from __future__ import annotations

import math

import numpy as np
import torch

from moed.model.checkpoint import _stored_bytes, make_config, tensor_specs
from moed.model.config import GlmMoeDsaConfig
from moed.offload.host_store import ExpertLayout
from moed.ops.bench.hitrate_sim import MOE_LAYERS, SHAPES, E, Shape, split_table

# MTP acceptance of the first draft token, published for the MTP module GLM-5.1 shares with DeepSeek-V3 (the rows
# at 0 are what random weights give).
PUBLISHED_MTP_ACCEPTANCE = 0.85
MTP_SOURCE = "DeepSeek-V3 Technical Report (arXiv:2412.19437) sec. 5.4.3: 85-90% for the 1st draft token"
# Top-k accuracy published for predicting a layer's experts from the previous layer's activations (~15 points below
# the 93-97% of same-layer pre-attention predictors: arXiv:2511.10676, on DeepSeek-V2-Lite and Qwen3-30B-A3B).
PREDICTOR_RECALL = 0.8


def glm51_config() -> GlmMoeDsaConfig:
    """GLM-5.1 whole, FP8 as released (model/checkpoint.py's GLM-5.1 values: 78 layers, the first 3 dense)."""
    raw = make_config("glm51-slice", fp8=True)
    raw.update(num_hidden_layers=78, first_k_dense_replace=3)
    return GlmMoeDsaConfig.from_dict(raw, source="GLM-5.1 (model/checkpoint.py)")


def deployment(gpu_gib: float, context: int, reserve_gib: float, config: str = "") -> dict:
    """The expert cache a deployment of the whole GLM-5.1 gets on one GPU (bytes, fraction, slots per layer):
    slots per layer = (GPU memory - non-expert weights - KV for one `context` sequence - reserve) / (75 MoE layers x
    expert bytes), the non-expert weights counted from the config as the FP8 release stores them; int4 experts
    (packed values, scales, zero points as the host store lays them out) in the same cache bytes."""
    cfg = GlmMoeDsaConfig.from_file(config) if config else glm51_config()
    if cfg.quantization is None:
        raise ValueError(f"{cfg.source}: the deployment is sized for the FP8 release (quantization_config needed)")
    nonexpert_fp8 = nonexpert_bf16 = 0
    for spec in tensor_specs(cfg):
        if ".experts." in spec.name:
            continue
        nonexpert_fp8 += _stored_bytes(spec, cfg, torch.bfloat16)
        nonexpert_bf16 += math.prod(spec.shape) * (4 if spec.fp32 else 2)
    layout = ExpertLayout.for_config(cfg)
    int4 = ExpertLayout.for_config(cfg, "int4")  # --expert-dtype int4: the format's packed values, scales and zeros
    # KV per token and layer: the MLA latent + rope key in bf16, the indexer's key in FP8 with an fp32 scale.
    kv_token = cfg.num_hidden_layers * (2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.index_head_dim + 4)
    gpu, reserve = int(gpu_gib * 2**30), int(reserve_gib * 2**30)
    out = {
        "gpu_bytes": gpu,
        "kv_bytes": kv_token * context,
        "context": context,
        "reserve_bytes": reserve,
        "expert_bytes_fp8": layout.expert_bytes,
        "all_expert_bytes_fp8": layout.expert_bytes * E * MOE_LAYERS,
        "expert_bytes_int4": int4.expert_bytes,
        "all_expert_bytes_int4": int4.expert_bytes * E * MOE_LAYERS,
        "nonexpert_bytes_fp8": nonexpert_fp8,
        "nonexpert_bytes_bf16": nonexpert_bf16,
    }
    for name, nonexpert in (("fp8", nonexpert_fp8), ("bf16", nonexpert_bf16)):
        cache = gpu - nonexpert - out["kv_bytes"] - reserve
        out[f"cache_bytes_nonexpert_{name}"] = cache
        out[f"fraction_nonexpert_{name}"] = cache / out["all_expert_bytes_fp8"]
        out[f"slots_nonexpert_{name}"] = int(cache // (layout.expert_bytes * MOE_LAYERS))
    out["slots_fp8"] = out["slots_nonexpert_fp8"]
    # Non-expert weights stay as the checkpoint has them with int4 experts: the same bytes for the cache.
    out["slots_int4"] = int(out["cache_bytes_nonexpert_fp8"] // (int4.expert_bytes * MOE_LAYERS))
    return out


def bytes_per_token(row: dict, expert_bytes: int, acceptance: float, shape: Shape) -> dict:
    """Whole-model expert bytes per accepted token: moved from host memory (copied or CPU-read) and read in HBM.
    The counts per step are measured (one simulated layer); x expert bytes x 75 layers takes every layer to route
    like it; the acceptance is assumed (random weights accept nothing). The MTP layer's own experts are left out."""
    accepted = shape.batch * (1 + acceptance * shape.spec_steps)
    moved = (row["copied"] + row["cpu"]) * expert_bytes * MOE_LAYERS / accepted
    return {
        "acceptance": acceptance,
        "moved_GB": moved / 1e9,
        "hbm_GB": row["hits"] * expert_bytes * MOE_LAYERS / accepted / 1e9,
        "distinct_per_token": row["distinct"] / accepted,
    }


def prefetch_bound(row: dict, expert_bytes: int, idle_ms: float, copy_GBps: float, joint_GBps: float) -> dict:
    """Batch 1: what copies started in the link's idle window before a layer's miss service can move, and what the
    current prefetch design (the layer waits for its prefetch before splitting) costs for one predicted expert."""
    copy_ms = expert_bytes / copy_GBps / 1e6
    miss_ms = (row["copied"] + row["cpu"]) * expert_bytes / joint_GBps / 1e6
    capacity = idle_ms / copy_ms  # experts' worth of bytes the idle link moves
    saved_if_right = expert_bytes / joint_GBps / 1e6
    return {
        "misses": row["copied"] + row["cpu"],
        "miss_service_ms": miss_ms,
        "expert_copy_ms": copy_ms,
        "idle_ms": idle_ms,
        "idle_capacity_experts": capacity,
        "hideable_share": min(1.0, capacity / max(row["copied"] + row["cpu"], 1e-9)),
        "hideable_share_recall": min(capacity, PREDICTOR_RECALL * (row["copied"] + row["cpu"]))
        / max(row["copied"] + row["cpu"], 1e-9),
        "wired_wait_ms": max(0.0, copy_ms - idle_ms),
        "wired_saved_if_right_ms": saved_if_right,
        "wired_net_ms_at_precision_1": saved_if_right - max(0.0, copy_ms - idle_ms),
    }


def finer_split_bound(row: dict, expert_bytes: int, cpu_GBps: float, copy_GBps: float) -> dict:
    """A split step's miss service, from its measured distribution of misses per step: whole experts as the hybrid
    service splits them (its table at these rates: the slower side's time) against splitting inside experts (each
    side takes a share of the intermediate columns, so both end together: n experts at the joint rate). The second
    is the most a finer split could give: it leaves out the per-slice launches, the partial sums' join and the
    bytes of a slice rounded to the format's 128-column blocks."""
    hist = np.asarray(row["miss_hist"], dtype=np.float64)
    n = np.arange(len(hist))
    shape = next(s for s in SHAPES if s.name == row["shape"])
    table, _ = split_table(shape, cpu_GBps * 1e9, copy_GBps * 1e9)
    c = table[1, : len(hist)].numpy()  # every step size has the same table at one CPU rate
    ms = expert_bytes / 1e6  # bytes -> ms at GB/s
    whole = np.maximum(c / cpu_GBps, (n - c) / copy_GBps) * ms
    column = n / (cpu_GBps + copy_GBps) * ms
    steps = max(hist.sum(), 1.0)
    w, f = float(hist @ whole / steps), float(hist @ column / steps)
    per_token = MOE_LAYERS / shape.tokens
    return {
        "steps": int(hist.sum()),
        "misses": float(hist @ n / steps),
        "whole_ms": w,
        "column_ms": f,
        "saved_share": 1 - f / w if w else 0.0,
        "saved_ms_per_token": (w - f) * per_token,
        "by_misses": {
            int(i): {
                "share_of_steps": float(hist[i] / steps),
                "whole_ms": float(whole[i]),
                "column_ms": float(column[i]),
            }
            for i in range(1, len(hist))
            if hist[i]
        },
    }
