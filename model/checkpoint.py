"""`moed checkpoint make`: random-weight GLM-5.1-architecture checkpoints in the release's layout.

Writes config.json (GLM-5.1's field names), sharded safetensors under the real tensor names with
`model.safetensors.index.json`, a locally trained tokenizer, tokenizer_config.json with a chat
template, and generation_config.json. Weights are drawn per tensor from a generator seeded by
(seed, tensor name), so a checkpoint is reproducible for a seed on a given device type. Shards are
generated and written one at a time: no more than one shard is ever held in memory.

`--dtype int4` writes the routed experts in compressed-tensors' `pack-quantized` W4A16_ASYM layout (as
llm-compressor writes AWQ/GPTQ releases; `moed.formats.int4`'s quantiser, group 128) and everything else in bf16.

Presets: `tiny` (the test suite's model: seconds on a CPU, a small `index_topk` so sparse selection
really drops positions), `small` (a CPU demo), `glm51-slice` (GLM-5.1's real per-layer dimensions,
few layers, for GPU benchmarks), `glm51` (GLM-5.1 whole: 78 layers of which 3 dense, the MTP layer, the
real vocabulary and widths; only `experts` may shrink it, since 256 experts per layer are ~750 GB in FP8:
with 8 per layer, so that every token still touches 8 experts per layer, it is ~42 GB).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from moed.formats import int4
from moed.formats.fp8 import quantize_block_fp8
from moed.model.config import GlmMoeDsaConfig
from moed.model.tokenizer import EOS_TOKENS, write_tokenizer

log = logging.getLogger(__name__)

# The GLM-5.1-FP8 release's config values (see the project's shared glm51/config.json).
GLM51 = {
    "vocab_size": 154880,
    "hidden_size": 6144,
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 78,
    "first_k_dense_replace": 3,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 2048,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "index_topk": 2048,
    "index_head_dim": 128,
    "index_n_heads": 32,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 202752,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}

PRESETS: dict[str, dict] = {
    # Grouped routing (n_group 4, topk_group 2) is exercised here though GLM-5.1 uses one group.
    "tiny": {
        **GLM51,
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "index_topk": 16,
        "index_head_dim": 32,
        "index_n_heads": 16,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 4096,
    },
    "small": {
        **GLM51,
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 6,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 256,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "index_topk": 128,
        "index_head_dim": 64,
        "index_n_heads": 8,
        "n_routed_experts": 64,
        "max_position_embeddings": 32768,
    },
    "glm51-slice": {**GLM51, "num_hidden_layers": 3, "first_k_dense_replace": 1},
    "glm51": dict(GLM51),
}
# Part of a built-in checkpoint's cache name: bumped whenever generation changes (weights, tokenizer, chat
# template), so a cache written by an older moed is regenerated instead of served. daemon/service.py names it too.
BUILTIN_REVISION = 2
TOKENIZER_VOCAB = {"tiny": 1024, "small": 4096, "glm51-slice": 8192, "glm51": 8192}
DEFAULT_SHARD_BYTES = {"tiny": 1 << 20, "small": 64 << 20, "glm51-slice": 5 << 30, "glm51": 5 << 30}
DTYPES = ("bf16", "fp8", "int4")
ROUTED_EXPERT = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"  # compressed-tensors target: routed experts only


@dataclasses.dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "linear" | "embed" | "norm" | "ln_bias" | "bias"
    quantize: bool  # stored as FP8 + weight_scale_inv when the checkpoint is FP8
    fp32: bool = False  # stored in fp32 whatever the checkpoint dtype


def make_config(
    preset: str,
    layers: int | None = None,
    experts: int | None = None,
    mtp_layers: int | None = None,
    fp8: bool = False,
    int4_experts: bool = False,
) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    raw = dict(PRESETS[preset])
    raw["architectures"] = ["GlmMoeDsaForCausalLM"]
    raw["model_type"] = "glm_moe_dsa"
    if layers is not None:
        raw["num_hidden_layers"] = layers
        raw["first_k_dense_replace"] = min(raw["first_k_dense_replace"], max(layers - 1, 0))
    if experts is not None:
        raw["n_routed_experts"] = experts
        raw["num_experts_per_tok"] = min(raw["num_experts_per_tok"], experts)
        if experts % raw["n_group"] or experts // raw["n_group"] < 2:
            raw["n_group"] = raw["topk_group"] = 1
    if mtp_layers is not None:
        raw["num_nextn_predict_layers"] = mtp_layers
    raw["head_dim"] = raw["qk_rope_head_dim"]
    if fp8:
        raw["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.embed_tokens", "mlp.gate", "indexer.weights_proj"],
        }
    if int4_experts:
        raw["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": [ROUTED_EXPERT],
                    "format": "pack-quantized",
                    "input_activations": None,
                    "output_activations": None,
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": False,
                        "strategy": "group",
                        "group_size": int4.GROUP_SIZE,
                        "dynamic": False,
                        "actorder": None,
                        "observer": "minmax",
                    },
                }
            },
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
        }
    return raw


def tensor_specs(cfg: GlmMoeDsaConfig) -> Iterator[TensorSpec]:
    """Every tensor of the checkpoint, in file order, under the release's names."""
    skip = cfg.quantization.modules_to_not_convert if cfg.quantization else ()

    def lin(name: str, out_f: int, in_f: int) -> TensorSpec:
        return TensorSpec(name, (out_f, in_f), "linear", quantize=not any(s in name for s in skip))

    H, nH = cfg.hidden_size, cfg.num_attention_heads
    yield TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, H), "embed", quantize=False)
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        if i >= cfg.num_hidden_layers:
            yield TensorSpec(f"{p}.enorm.weight", (H,), "norm", False)
            yield TensorSpec(f"{p}.hnorm.weight", (H,), "norm", False)
            yield lin(f"{p}.eh_proj.weight", H, 2 * H)
            yield TensorSpec(f"{p}.shared_head.norm.weight", (H,), "norm", False)
        yield TensorSpec(f"{p}.input_layernorm.weight", (H,), "norm", False)
        yield TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "norm", False)
        a = f"{p}.self_attn"
        yield lin(f"{a}.q_a_proj.weight", cfg.q_lora_rank, H)
        yield TensorSpec(f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,), "norm", False)
        yield lin(f"{a}.q_b_proj.weight", nH * cfg.qk_head_dim, cfg.q_lora_rank)
        yield lin(f"{a}.kv_a_proj_with_mqa.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
        yield TensorSpec(f"{a}.kv_a_layernorm.weight", (cfg.kv_lora_rank,), "norm", False)
        yield lin(f"{a}.kv_b_proj.weight", nH * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        yield lin(f"{a}.o_proj.weight", H, nH * cfg.v_head_dim)
        if i >= cfg.num_hidden_layers or cfg.indexer_types[i] == "full":
            x = f"{a}.indexer"
            yield lin(f"{x}.wq_b.weight", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
            yield lin(f"{x}.wk.weight", cfg.index_head_dim, H)
            yield TensorSpec(f"{x}.k_norm.weight", (cfg.index_head_dim,), "norm", False)
            yield TensorSpec(f"{x}.k_norm.bias", (cfg.index_head_dim,), "ln_bias", False)
            yield lin(f"{x}.weights_proj.weight", cfg.index_n_heads, H)
        m = f"{p}.mlp"
        if cfg.is_moe_layer(i):
            yield TensorSpec(f"{m}.gate.weight", (cfg.n_routed_experts, H), "linear", False)
            yield TensorSpec(f"{m}.gate.e_score_correction_bias", (cfg.n_routed_experts,), "bias", False, fp32=True)
            inter = cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                yield lin(f"{m}.experts.{e}.gate_proj.weight", inter, H)
                yield lin(f"{m}.experts.{e}.up_proj.weight", inter, H)
                yield lin(f"{m}.experts.{e}.down_proj.weight", H, inter)
            shared = inter * cfg.n_shared_experts
            yield lin(f"{m}.shared_experts.gate_proj.weight", shared, H)
            yield lin(f"{m}.shared_experts.up_proj.weight", shared, H)
            yield lin(f"{m}.shared_experts.down_proj.weight", H, shared)
        else:
            yield lin(f"{m}.gate_proj.weight", cfg.intermediate_size, H)
            yield lin(f"{m}.up_proj.weight", cfg.intermediate_size, H)
            yield lin(f"{m}.down_proj.weight", H, cfg.intermediate_size)
    yield TensorSpec("model.norm.weight", (H,), "norm", False)
    if not cfg.tie_word_embeddings:
        yield TensorSpec("lm_head.weight", (cfg.vocab_size, H), "linear", False)


def _int4_expert(spec: TensorSpec, cfg: GlmMoeDsaConfig) -> bool:
    return cfg.pack_quantization is not None and ".mlp.experts." in spec.name


def _stored_bytes(spec: TensorSpec, cfg: GlmMoeDsaConfig, dtype: torch.dtype) -> int:
    n = math.prod(spec.shape)
    if spec.fp32:
        return 4 * n
    if _int4_expert(spec, cfg):
        return int4.nbytes(*spec.shape) + 16
    if cfg.quantization is not None and spec.quantize:
        q = cfg.quantization
        return n + 4 * (-(-spec.shape[0] // q.block_n)) * (-(-spec.shape[1] // q.block_k))
    return n * torch.finfo(dtype).bits // 8


def checkpoint_bytes(cfg: GlmMoeDsaConfig) -> dict[str, int]:
    """Stored bytes of `cfg`'s checkpoint by kind: routed experts, the MTP layers' other tensors, and the rest."""
    out = {"routed_experts": 0, "mtp": 0, "other": 0}
    mtp = tuple(f"model.layers.{i}." for i in cfg.mtp_layer_ids)
    for spec in tensor_specs(cfg):
        b = _stored_bytes(spec, cfg, torch.bfloat16)
        kind = "routed_experts" if ".mlp.experts." in spec.name else "mtp" if spec.name.startswith(mtp) else "other"
        out[kind] += b
    return out


def _draw(spec: TensorSpec, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % (1 << 63))
    x = torch.randn(spec.shape, generator=g, device=device, dtype=torch.float32)
    if spec.init == "linear":
        return x * spec.shape[-1] ** -0.5  # unit-variance outputs keep a deep random stack well scaled
    if spec.init == "norm":
        return 1.0 + 0.1 * x
    if spec.init == "bias":
        return 0.05 * x  # comparable to the spread of sigmoid scores: it changes which experts win
    if spec.init == "ln_bias":
        return 0.1 * x
    return x


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    dtype: str = "bf16",
    seed: int = 0,
    layers: int | None = None,
    experts: int | None = None,
    mtp_layers: int | None = None,
    shard_bytes: int | None = None,
    device: str | None = None,
    config_overrides: dict | None = None,
) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = make_config(preset, layers, experts, mtp_layers, fp8=dtype == "fp8", int4_experts=dtype == "int4")
    raw.update(config_overrides or {})
    cfg = GlmMoeDsaConfig.from_dict(raw, source=f"preset {preset}")
    gen_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ids = write_tokenizer(out, min(TOKENIZER_VOCAB[preset], cfg.vocab_size), cfg.max_position_embeddings)
    raw["eos_token_id"] = [ids[t] for t in EOS_TOKENS]
    raw["pad_token_id"] = ids["<|endoftext|>"]
    raw["bos_token_id"] = ids["[gMASK]"]
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "_from_model_config": True,
                "bos_token_id": raw["bos_token_id"],
                "eos_token_id": raw["eos_token_id"],
                "pad_token_id": raw["pad_token_id"],
                "do_sample": True,
                "temperature": 1.0,
                "top_p": 0.95,
            },
            indent=2,
        )
        + "\n"
    )

    store_dtype = torch.bfloat16
    limit = shard_bytes or DEFAULT_SHARD_BYTES[preset]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensor_specs(cfg):
        b = _stored_bytes(spec, cfg, store_dtype)
        if shards[-1] and size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += b
    weight_map: dict[str, str] = {}
    total = 0
    q = cfg.quantization
    for n, specs in enumerate(shards, start=1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for spec in specs:
            w = _draw(spec, seed, gen_device)
            if spec.fp32:
                tensors[spec.name] = w.cpu()
            elif _int4_expert(spec, cfg):
                base = spec.name.removesuffix(".weight")
                for suffix, t in int4.to_pack_quantized(int4.quantize_int4(w.to(store_dtype))).items():
                    tensors[f"{base}.{suffix}"] = t.cpu()
            elif q is not None and spec.quantize:
                wq, scale = quantize_block_fp8(w, q.block_n, q.block_k)
                sname = spec.name.removesuffix(".weight") + ".weight_scale_inv"
                tensors[spec.name], tensors[sname] = wq.cpu(), scale.cpu()
            else:
                tensors[spec.name] = w.to(store_dtype).cpu()
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", fname, len(tensors))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def builtin_checkpoint(name: str) -> Path:
    """A built-in preset checkpoint ('tiny' or 'small'), generated once into the cache directory.

    The cache is $MOED_CACHE or ~/.cache/moed; the directory is written under a temporary name and
    renamed, so a concurrent or interrupted generation never leaves a half-written checkpoint.
    """
    import os
    import shutil
    import tempfile

    if name not in ("tiny", "small"):
        raise ValueError(f"'{name}' is not a built-in checkpoint (built-in: tiny, small)")
    root = Path(os.environ.get("MOED_CACHE", Path.home() / ".cache" / "moed"))
    target = root / f"{name}-bf16-seed0-r{BUILTIN_REVISION}"
    if (target / "model.safetensors.index.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        make_checkpoint(tmp, name, dtype="bf16", seed=0, device="cpu")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors.index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
