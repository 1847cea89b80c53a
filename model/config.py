"""GLM-5.1 (`GlmMoeDsaForCausalLM`) configuration parsed from an HF `config.json`.

Every field the architecture uses is a typed attribute; fields moed does not know are kept in
`extra` so a config round-trips. A missing, mistyped or inconsistent field raises `ConfigError`
naming the field and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

# How routed experts are held after loading: as the checkpoint stores them (bf16, FP8 block or int4 pack-quantized),
# or quantised to moed's int4 format at load (`moed.formats.int4`). The one declaration flags and configs import.
ExpertDtype = Literal["checkpoint", "int4"]
EXPERT_DTYPES: tuple[ExpertDtype, ...] = ("checkpoint", "int4")
# The format routed experts are held in once loaded (`GlmMoeDsaConfig.expert_format`): what the host store, the GPU
# cache, the copies and the MoE kernels are built for.
ExpertFormat = Literal["bf16", "fp8", "int4"]


class ConfigError(ValueError):
    """A config.json that cannot describe a GLM-5.1 model; the message names the file and field."""


_REQUIRED: dict[str, type] = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "moe_intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "q_lora_rank": int,
    "kv_lora_rank": int,
    "qk_nope_head_dim": int,
    "qk_rope_head_dim": int,
    "v_head_dim": int,
    "index_topk": int,
    "index_head_dim": int,
    "index_n_heads": int,
    "n_routed_experts": int,
    "num_experts_per_tok": int,
    "first_k_dense_replace": int,
}

# Optional fields and the value HF's GlmMoeDsaConfig gives them when absent.
_OPTIONAL: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "num_key_value_heads": (int, None),
    "n_shared_experts": (int, 1),
    "n_group": (int, 1),
    "topk_group": (int, 1),
    "routed_scaling_factor": ((int, float), 1.0),
    "norm_topk_prob": (bool, True),
    "scoring_func": (str, "sigmoid"),
    "topk_method": (str, "noaux_tc"),
    "hidden_act": (str, "silu"),
    "rms_norm_eps": ((int, float), 1e-5),
    "max_position_embeddings": (int, 202752),
    "num_nextn_predict_layers": (int, 0),
    "tie_word_embeddings": (bool, False),
    "attention_bias": (bool, False),
    "mlp_bias": (bool, False),
    "bos_token_id": ((int, type(None)), None),
    "eos_token_id": ((int, list, type(None)), None),
    "pad_token_id": ((int, type(None)), None),
    "dtype": ((str, type(None)), None),
    "torch_dtype": ((str, type(None)), None),
}

# Keys the parser consumes itself (derived or restructured), so they are not kept in `extra`.
_CONSUMED = {
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "quantization_config",
    "indexer_types",
    "index_topk_pattern",
    "index_topk_freq",
    "index_skip_topk_offset",
    "mlp_layer_types",
    "architectures",
    "model_type",
    "head_dim",
    "layer_types",
}


@dataclasses.dataclass(frozen=True)
class Fp8Quantization:
    """DeepSeek-style FP8: e4m3 weights, one fp32 `weight_scale_inv` per block, dynamic activations."""

    block_n: int
    block_k: int
    modules_to_not_convert: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PackQuantization:
    """compressed-tensors `pack-quantized` integer weights, weight-only (W4A16 or W4A16_ASYM AWQ/GPTQ releases).

    Which Linear layers are quantised is read from the checkpoint's tensors (`<name>.weight_packed`), so targets and
    ignore lists need no matching here; symmetric or not per weight from the presence of `weight_zero_point`."""

    num_bits: int
    group_size: int
    raw: dict[str, Any]  # quantization_config as given, written back unchanged by to_json_dict


@dataclasses.dataclass(frozen=True)
class GlmMoeDsaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_topk: int
    index_head_dim: int
    index_n_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str
    topk_method: str
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    first_k_dense_replace: int
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_type: str
    indexer_types: tuple[str, ...]
    quantization: Fp8Quantization | None
    pack_quantization: PackQuantization | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    dtype: str | None
    extra: dict[str, Any]
    source: str = "<dict>"

    # Derived quantities, named as the model names them.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        # yarn's mscale would enter here; only the default rope type is accepted (see _parse_rope).
        return self.qk_head_dim**-0.5

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        # The MTP layers (index >= num_hidden_layers) are MoE layers too.
        return layer >= self.first_k_dense_replace

    @property
    def mtp_layer_ids(self) -> list[int]:
        return list(range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers))

    def expert_format(self, expert_dtype: ExpertDtype = "checkpoint") -> ExpertFormat:
        """The format routed experts are held in after loading with `expert_dtype`: int4 when quantised at load or
        stored pack-quantized, else FP8 block or bf16 as the checkpoint stores them."""
        if expert_dtype == "int4" or self.pack_quantization is not None:
            return "int4"
        return "fp8" if self.quantization is not None else "bf16"

    def to_json_dict(self) -> dict[str, Any]:
        """The config.json this config came from, with moed's normalisations applied."""
        out: dict[str, Any] = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa"}
        for f in dataclasses.fields(self):
            if f.name in (
                "extra",
                "source",
                "quantization",
                "pack_quantization",
                "indexer_types",
                "rope_theta",
                "rope_type",
                "eos_token_ids",
            ):
                continue
            out[f.name] = getattr(self, f.name)
        out["eos_token_id"] = list(self.eos_token_ids)
        out["head_dim"] = self.qk_rope_head_dim
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if any(t != "full" for t in self.indexer_types):
            out["indexer_types"] = list(self.indexer_types)
        if self.quantization is not None:
            q = self.quantization
            out["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [q.block_n, q.block_k],
                "modules_to_not_convert": list(q.modules_to_not_convert),
            }
        if self.pack_quantization is not None:
            out["quantization_config"] = self.pack_quantization.raw
        out.update(self.extra)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_file(cls, path: str | Path) -> GlmMoeDsaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> GlmMoeDsaConfig:
        def err(field: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}': {msg}")

        arch = raw.get("architectures")
        if arch is not None and "GlmMoeDsaForCausalLM" not in arch:
            raise err("architectures", f"{arch} does not name GlmMoeDsaForCausalLM")
        values: dict[str, Any] = {}
        for name, typ in _REQUIRED.items():
            if name not in raw:
                raise err(name, "missing (required by the GLM-5.1 architecture)")
            v = raw[name]
            if not isinstance(v, typ) or isinstance(v, bool):
                raise err(name, f"expected {typ.__name__}, got {v!r}")
            if v <= 0 and name != "first_k_dense_replace":
                raise err(name, f"must be positive, got {v}")
            values[name] = v
        for name, (typ, default) in _OPTIONAL.items():
            v = raw.get(name, default)
            if v is not None and not isinstance(v, typ):
                raise err(name, f"has the wrong type: {v!r}")
            values[name] = v
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        values["routed_scaling_factor"] = float(values["routed_scaling_factor"])
        values["rms_norm_eps"] = float(values["rms_norm_eps"])
        values["rope_theta"], values["rope_type"] = _parse_rope(raw, err)
        values["indexer_types"] = _parse_indexer_types(raw, values["num_hidden_layers"], err)
        qcfg = raw.get("quantization_config")
        is_pack = isinstance(qcfg, dict) and qcfg.get("quant_method") == "compressed-tensors"
        values["pack_quantization"] = _parse_pack_quantization(qcfg, err) if is_pack else None
        values["quantization"] = None if is_pack else _parse_quantization(qcfg, err)
        eos = values.pop("eos_token_id")
        values["eos_token_ids"] = tuple([eos] if isinstance(eos, int) else (eos or []))
        if values["dtype"] is None:
            values["dtype"] = values["torch_dtype"]
        del values["torch_dtype"]
        known = set(_REQUIRED) | set(_OPTIONAL) | _CONSUMED
        values["extra"] = {k: v for k, v in raw.items() if k not in known}
        cfg = cls(**values, source=source)
        _check_consistency(cfg, raw, err)
        return cfg


def generation_eos_ids(model_dir: Path) -> frozenset[int]:
    """EOS ids generation_config.json adds to config.json's (HF merges both the same way)."""
    path = model_dir / "generation_config.json"
    if not path.exists():
        return frozenset()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _parse_rope(raw: dict[str, Any], err) -> tuple[float, str]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise err("rope_parameters", f"expected an object, got {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise err("rope_parameters.rope_theta", "missing (never assumed: releases differ)")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise err("rope_parameters.rope_theta", f"must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise err("rope_parameters.rope_type", f"'{rope_type}' is not supported (only 'default')")
    return float(theta), rope_type


def _parse_indexer_types(raw: dict[str, Any], n_layers: int, err) -> tuple[str, ...]:
    # Same derivation as transformers' GlmMoeDsaConfig.__post_init__.
    types = raw.get("indexer_types")
    if types is None:
        pattern = raw.get("index_topk_pattern")
        if pattern is not None:
            letters = {"F": "full", "S": "shared"}
            if isinstance(pattern, str):
                if any(c not in letters for c in pattern):
                    raise err("index_topk_pattern", f"letters must be F or S, got {pattern!r}")
                types = [letters[c] for c in pattern]
            else:
                types = list(pattern)
        else:
            freq = max(int(raw.get("index_topk_freq", 1)), 1)
            offset = int(raw.get("index_skip_topk_offset", 2))
            types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(n_layers)]
    if not isinstance(types, list) or any(t not in ("full", "shared") for t in types):
        raise err("indexer_types", f"must be a list of 'full'/'shared', got {types!r}")
    if len(types) < n_layers:
        raise err("indexer_types", f"has {len(types)} entries for {n_layers} layers")
    if types[0] != "full":
        raise err("indexer_types", "layer 0 must be 'full' (a 'shared' layer reuses an earlier full one)")
    return tuple(types[:n_layers])


def _parse_quantization(q: Any, err) -> Fp8Quantization | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise err("quantization_config", f"expected an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise err(
            "quantization_config.quant_method",
            f"'{method}' is not supported (only 'fp8' and 'compressed-tensors' with format 'pack-quantized')",
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise err("quantization_config.fmt", f"'{fmt}' is not supported (only 'e4m3')")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise err("quantization_config.activation_scheme", "only 'dynamic' is supported")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise err("quantization_config.weight_block_size", f"expected [n, k], got {block!r}")
    skip = q.get("modules_to_not_convert") or []
    return Fp8Quantization(block_n=block[0], block_k=block[1], modules_to_not_convert=tuple(skip))


def _parse_pack_quantization(q: dict[str, Any], err) -> PackQuantization:
    """compressed-tensors config -> PackQuantization; anything but 4-bit weight-only int groups is refused here."""
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise err("quantization_config.config_groups", f"expected a non-empty object, got {groups!r}")
    sizes = set()
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise err(where, "needs a 'weights' object")
        fmt = group.get("format") or q.get("format")
        if fmt != "pack-quantized":
            raise err(f"{where}.format", f"'{fmt}' is not supported (only 'pack-quantized')")
        if group.get("input_activations") is not None:
            raise err(f"{where}.input_activations", "only weight-only schemes (W4A16) are supported")
        w = group["weights"]
        for key, want in (("num_bits", 4), ("type", "int"), ("strategy", "group")):
            if w.get(key) != want:
                raise err(f"{where}.weights.{key}", f"{w.get(key)!r} is not supported (want {want!r})")
        if w.get("actorder") == "group":
            raise err(f"{where}.weights.actorder", "'group' (activation-ordered groups) is not supported")
        gs = w.get("group_size")
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 8 or gs & (gs - 1):
            raise err(f"{where}.weights.group_size", f"expected a power of two >= 8, got {gs!r}")
        sizes.add(gs)
    if len(sizes) != 1:
        raise err("quantization_config.config_groups", f"groups disagree on group_size ({sorted(sizes)})")
    return PackQuantization(num_bits=4, group_size=sizes.pop(), raw=q)


def _check_consistency(cfg: GlmMoeDsaConfig, raw: dict[str, Any], err) -> None:
    if cfg.hidden_act != "silu":
        raise err("hidden_act", f"'{cfg.hidden_act}' is not supported (GLM-5.1 uses silu)")
    if cfg.scoring_func != "sigmoid":
        raise err("scoring_func", f"'{cfg.scoring_func}' is not supported (GLM-5.1 uses sigmoid)")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        raise err("first_k_dense_replace", f"{cfg.first_k_dense_replace} > num_hidden_layers {cfg.num_hidden_layers}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise err(
            "num_key_value_heads",
            f"{cfg.num_key_value_heads} does not divide num_attention_heads {cfg.num_attention_heads}",
        )
    if cfg.qk_rope_head_dim % 2:
        raise err("qk_rope_head_dim", f"must be even for rotary pairs, got {cfg.qk_rope_head_dim}")
    if cfg.index_head_dim < cfg.qk_rope_head_dim:
        raise err(
            "index_head_dim",
            f"{cfg.index_head_dim} < qk_rope_head_dim {cfg.qk_rope_head_dim} "
            "(the indexer ropes its first qk_rope_head_dim dims)",
        )
    if cfg.n_routed_experts % cfg.n_group:
        raise err("n_group", f"{cfg.n_group} does not divide n_routed_experts {cfg.n_routed_experts}")
    if not 1 <= cfg.topk_group <= cfg.n_group:
        raise err("topk_group", f"must be in [1, n_group={cfg.n_group}], got {cfg.topk_group}")
    per_group = cfg.n_routed_experts // cfg.n_group
    if cfg.n_group > 1 and per_group < 2:
        raise err("n_group", "each group needs >= 2 experts (groups are scored by their top-2)")
    if cfg.num_experts_per_tok > cfg.topk_group * per_group:
        raise err(
            "num_experts_per_tok",
            f"{cfg.num_experts_per_tok} > experts reachable through topk_group={cfg.topk_group} groups of {per_group}",
        )
    if cfg.num_nextn_predict_layers < 0:
        raise err("num_nextn_predict_layers", "must be >= 0")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != cfg.qk_rope_head_dim:
        # HF points head_dim at the rope slice; a different value means a different rotary width.
        raise err("head_dim", f"{head_dim} != qk_rope_head_dim {cfg.qk_rope_head_dim}")
    for tid_field in ("bos_token_id", "pad_token_id"):
        tid = getattr(cfg, tid_field)
        if tid is not None and not 0 <= tid < cfg.vocab_size:
            raise err(tid_field, f"{tid} outside the vocabulary [0, {cfg.vocab_size})")
    for tid in cfg.eos_token_ids:
        if not isinstance(tid, int) or not 0 <= tid < cfg.vocab_size:
            raise err("eos_token_id", f"{tid!r} outside the vocabulary [0, {cfg.vocab_size})")
    assert math.isfinite(cfg.rope_theta)
