"""config.json parsing: every field the architecture uses, clear errors naming field and file."""

from __future__ import annotations

import json

import pytest

from moed.model.checkpoint import GLM51, make_config
from moed.model.config import ConfigError, GlmMoeDsaConfig


def _write(tmp_path, raw):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(raw))
    return p


def _release_config():
    raw = make_config("glm51-slice", layers=78, fp8=True)
    raw.update(first_k_dense_replace=3, eos_token_id=[154820, 154827, 154829], pad_token_id=154820, bos_token_id=0)
    return raw


def test_release_config_parses_with_real_dimensions(tmp_path):
    cfg = GlmMoeDsaConfig.from_file(_write(tmp_path, _release_config()))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.q_lora_rank) == (6144, 64, 512, 2048)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (256, 8, 2048)
    assert cfg.num_moe_layers == 75 and cfg.mtp_layer_ids == [78]
    assert cfg.qk_head_dim == 256 and cfg.softmax_scale == 256**-0.5
    assert cfg.quantization is not None and (cfg.quantization.block_n, cfg.quantization.block_k) == (128, 128)
    assert "indexer.weights_proj" in cfg.quantization.modules_to_not_convert
    assert cfg.eos_token_ids == (154820, 154827, 154829)
    assert cfg.indexer_types == ("full",) * 78
    assert cfg.rope_theta == GLM51["rope_parameters"]["rope_theta"]


def test_unknown_fields_are_kept(tmp_path):
    raw = _release_config() | {"some_future_field": {"a": 1}}
    cfg = GlmMoeDsaConfig.from_file(_write(tmp_path, raw))
    assert cfg.extra["some_future_field"] == {"a": 1}
    assert cfg.to_json_dict()["some_future_field"] == {"a": 1}
    again = GlmMoeDsaConfig.from_dict(cfg.to_json_dict())
    assert again.to_json_dict() == cfg.to_json_dict()


def test_legacy_top_level_rope_theta(tmp_path):
    raw = _release_config()
    del raw["rope_parameters"]
    raw["rope_theta"] = 8e6
    assert GlmMoeDsaConfig.from_file(_write(tmp_path, raw)).rope_theta == 8e6


@pytest.mark.parametrize("field", ["hidden_size", "kv_lora_rank", "index_topk", "n_routed_experts"])
def test_missing_field_is_named(tmp_path, field):
    raw = _release_config()
    del raw[field]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=rf"{path}.*'{field}'.*missing"):
        GlmMoeDsaConfig.from_file(path)


def test_missing_rope_theta_is_named(tmp_path):
    raw = _release_config()
    raw["rope_parameters"] = {"rope_type": "default"}
    with pytest.raises(ConfigError, match="rope_theta"):
        GlmMoeDsaConfig.from_file(_write(tmp_path, raw))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"first_k_dense_replace": 99}, "first_k_dense_replace"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"hidden_size": "6144"}, "hidden_size"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"head_dim": 128}, "head_dim"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"eos_token_id": [999999]}, "eos_token_id"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}}, "rope_type"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"index_topk_pattern": "FX"}, "index_topk_pattern"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ],
)
def test_inconsistent_field_is_named(tmp_path, change, field):
    path = _write(tmp_path, _release_config() | change)
    with pytest.raises(ConfigError, match=rf"{path}.*{field}"):
        GlmMoeDsaConfig.from_file(path)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GlmMoeDsaConfig.from_file(p)
    with pytest.raises(ConfigError, match="no such config file"):
        GlmMoeDsaConfig.from_file(tmp_path / "absent.json")
