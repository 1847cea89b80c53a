"""Int4 routed experts at load: compressed-tensors pack-quantized checkpoints, `expert_dtype="int4"`, the cache.

The oracle is transformers' GlmMoeDsaForCausalLM on an independently dequantised fp32 copy of the int4 checkpoint
(transformers reads compressed-tensors checkpoints only through the compressed-tensors package).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moed.attention.reference import ReferenceAttention
from moed.formats import int4
from moed.model import weights as weights_mod
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.config import ConfigError, GlmMoeDsaConfig
from moed.model.weights import CheckpointError, load_model
from moed.offload.torch_runner import TorchMoERunner

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_int4(tiny_int4_checkpoint) -> str:
    return tiny_int4_checkpoint


def _load(path, **kw):
    cfg = GlmMoeDsaConfig.from_file(Path(path) / "config.json")
    runner = TorchMoERunner(cfg, torch.float32, expert_dtype=kw.get("expert_dtype", "checkpoint"))
    return load_model(path, runner, dtype=torch.float32, mtp=False, config=cfg, **kw), runner, cfg


@torch.no_grad()
def _logits(model, runner, cfg, ids: torch.Tensor) -> torch.Tensor:
    attn = ReferenceAttention(cfg)
    n = ids.shape[0]
    ctx = StepContext(positions=torch.arange(n), seqs=[SequenceStep(0, n, attn.new_sequence())])
    return model.logits(model(ids, ctx, attn, runner))


def _ids(cfg, n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _unpack_rows(words: torch.Tensor, along_rows: bool) -> torch.Tensor:
    """Independent of moed.formats.int4: 4-bit fields of int32 words (field k at bits 4k) minus the offset 8."""
    fields = torch.stack([(words.long() >> (4 * k)) & 0xF for k in range(8)], dim=1 if along_rows else -1)
    return (fields.flatten(0, 1) if along_rows else fields.flatten(-2)) - 8


def _dequantize_checkpoint(src: str, dst: Path) -> None:
    """An fp32 copy with every pack-quantized weight expanded elementwise: (q - z) * scale[row, col // group]."""
    dst.mkdir()
    cfg = json.loads((Path(src) / "config.json").read_text())
    group = cfg.pop("quantization_config")["config_groups"]["group_0"]["weights"]["group_size"]
    (dst / "config.json").write_text(json.dumps(cfg))
    index = json.loads((Path(src) / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(Path(src) / shard)))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            base = name.removesuffix(".weight_packed")
            rows, cols = tensors[base + ".weight_shape"].tolist()
            q = _unpack_rows(t, along_rows=False)[:, :cols].float()
            col_group = torch.arange(cols) // group
            zp = tensors.get(base + ".weight_zero_point")
            z = _unpack_rows(zp, along_rows=True)[:rows].float()[:, col_group] if zp is not None else 0.0
            out[base + ".weight"] = (q - z) * tensors[base + ".weight_scale"].float()[:, col_group]
        elif not name.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
            out[name] = t.float().contiguous()
    save_file(out, str(dst / "model.safetensors"))


def test_int4_checkpoint_layout(tiny_int4):
    cfg = GlmMoeDsaConfig.from_file(Path(tiny_int4) / "config.json")
    assert cfg.pack_quantization is not None and cfg.pack_quantization.group_size == 128 and cfg.quantization is None
    assert cfg.to_json_dict()["quantization_config"]["format"] == "pack-quantized"
    index = json.loads((Path(tiny_int4) / "model.safetensors.index.json").read_text())["weight_map"]
    p = "model.layers.1.mlp.experts.3.down_proj"
    assert {f"{p}.weight_packed", f"{p}.weight_scale", f"{p}.weight_zero_point", f"{p}.weight_shape"} <= set(index)
    assert f"{p}.weight" not in index
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in index  # non-routed weights stay bf16
    t = load_file(str(Path(tiny_int4) / index[f"{p}.weight_packed"]))
    assert t[f"{p}.weight_packed"].dtype == torch.int32 and tuple(t[f"{p}.weight_packed"].shape) == (128, 8)
    assert t[f"{p}.weight_scale"].dtype == torch.bfloat16 and tuple(t[f"{p}.weight_zero_point"].shape) == (16, 1)


def test_int4_checkpoint_matches_transformers_on_dequantised_copy(tiny_int4, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, runner, cfg = _load(tiny_int4)
    assert all(w["w13"].dtype == torch.uint8 for w in runner.weights.values())  # held as int4, not dequantised
    _dequantize_checkpoint(tiny_int4, tmp_path / "deq")
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(str(tmp_path / "deq"), dtype=torch.float32).eval()
    ids = _ids(cfg, 3 * cfg.index_topk)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert _rel(_logits(model, runner, cfg, ids), ref) <= TOL


def _expert_sq_errors(int4_runner, bf16_runner) -> torch.Tensor:
    """Squared error of every int4 expert matrix against the bf16 one, [layers, experts, 2] (w13, w2)."""
    out = []
    for layer, w in sorted(int4_runner.weights.items()):
        ref = bf16_runner.weights[layer]
        per = []
        for e in range(w["w13"].shape[0]):
            errs = []
            for name, full in (("w13", ref["w13"][e]), ("w2", ref["w2"][e])):
                q = int4.Int4Weight(w[name][e], w[f"{name}_scale"][e], w[f"{name}_zeros"][e], int4.GROUP_SIZE)
                errs.append(float((int4.dequantize_int4(q) - full.float()).square().sum()))
            per.append(errs)
        out.append(per)
    return torch.tensor(out, dtype=torch.float64)


def test_expert_dtype_int4_fits_closer_than_the_int4_checkpoint_and_stays_close_to_bf16(tiny_checkpoint, tiny_int4):
    """Quantised at load, each group's range is fitted (clip search); `moed checkpoint make --dtype int4` writes
    llm-compressor's min/max rule. Every expert matrix of the first is at least as close to the bf16 weights."""
    q_model, q_runner, cfg = _load(tiny_checkpoint, expert_dtype="int4")
    c_model, c_runner, _ = _load(tiny_int4)
    b_model, b_runner, _ = _load(tiny_checkpoint)
    fitted, plain = _expert_sq_errors(q_runner, b_runner), _expert_sq_errors(c_runner, b_runner)
    assert (fitted <= plain * (1 + 1e-6)).all() and fitted.sum() < 0.98 * plain.sum()
    ids = _ids(cfg)
    quantised = _logits(q_model, q_runner, cfg, ids)
    bf16 = _logits(b_model, b_runner, cfg, ids)
    drift = _rel(quantised, bf16)
    assert 1e-4 < drift < 0.5  # quantised for real, and not broken (docs/benchmarks.md has the measured drift)
    assert 1e-4 < _rel(_logits(c_model, c_runner, cfg, ids), bf16) < 0.5


def test_expert_dtype_int4_from_fp8(tiny_fp8_checkpoint):
    q_model, q_runner, cfg = _load(tiny_fp8_checkpoint, expert_dtype="int4")
    assert all(w["w13"].dtype == torch.uint8 for w in q_runner.weights.values())
    f_model, f_runner, _ = _load(tiny_fp8_checkpoint)
    ids = _ids(cfg)
    assert 1e-4 < _rel(_logits(q_model, q_runner, cfg, ids), _logits(f_model, f_runner, cfg, ids)) < 0.5


def test_int4_cache_is_used_then_rebuilt_when_broken(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first, r1, cfg = _load(tiny_checkpoint, expert_dtype="int4", int4_cache_dir=cache)
    files = sorted(cache.glob("*/layer-*.safetensors"))
    assert len(files) == cfg.num_moe_layers

    def refuse(*a, **k):
        raise AssertionError("quantised although the cache holds this layer")

    monkeypatch.setattr(weights_mod, "quantize_expert", refuse)
    second, r2, _ = _load(tiny_checkpoint, expert_dtype="int4", int4_cache_dir=cache)
    ids = _ids(cfg)
    assert torch.equal(_logits(first, r1, cfg, ids), _logits(second, r2, cfg, ids))
    monkeypatch.undo()
    files[0].write_bytes(b"not a safetensors file")
    third, r3, _ = _load(tiny_checkpoint, expert_dtype="int4", int4_cache_dir=cache)
    assert "unusable" in caplog.text
    assert torch.equal(_logits(first, r1, cfg, ids), _logits(third, r3, cfg, ids))
    assert load_file(str(files[0]))  # rewritten whole


def _ct_symmetric(w: torch.Tensor, group: int) -> int4.Int4Weight:
    """compressed-tensors' symmetric rule (absmax / 7.5, clamp to [-8, 7]): what a W4A16 release stores."""
    g = w.float().view(w.shape[0], -1, group)
    scale = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
    q = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).view(w.shape)
    return int4.Int4Weight(int4.pack_int4(q), scale, None, group)


@pytest.fixture(scope="module")
def tiny_symmetric(tiny_checkpoint, tmp_path_factory) -> str:
    """A W4A16 (symmetric) community-style checkpoint: routed experts and the shared experts pack-quantized."""
    dst = tmp_path_factory.mktemp("tiny_w4a16") / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
            }
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"],
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(dst / shard))
        out = {}
        for name, t in tensors.items():
            if ".mlp.experts." in name or ".mlp.shared_experts." in name:
                base = name.removesuffix(".weight")
                for suffix, v in int4.to_pack_quantized(_ct_symmetric(t, 32)).items():
                    out[f"{base}.{suffix}"] = v
                    index["weight_map"][f"{base}.{suffix}"] = shard
                del index["weight_map"][name]
            else:
                out[name] = t
        save_file(out, str(dst / shard))
    index_path.write_text(json.dumps(index))
    return str(dst)


def test_symmetric_community_checkpoint_matches_transformers(tiny_symmetric, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, runner, cfg = _load(tiny_symmetric)
    assert runner.int4 is not None and runner.int4.group == 32
    assert (runner.weights[1]["w13_zeros"] == int4.pack_zeros(torch.zeros(8, 1, dtype=torch.int8))[0, 0]).all()
    _dequantize_checkpoint(tiny_symmetric, tmp_path / "deq")
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(str(tmp_path / "deq"), dtype=torch.float32).eval()
    ids = _ids(cfg, 2 * cfg.index_topk)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert _rel(_logits(model, runner, cfg, ids), ref) <= TOL


def _edit(src: str, dst: Path, name: str, fn) -> str:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / index[name]
    tensors = load_file(str(shard))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(shard))
    return str(dst)


def test_bad_int4_checkpoints_are_named(tiny_int4, tmp_path):
    p = "model.layers.2.mlp.experts.5.up_proj"
    bad = _edit(tiny_int4, tmp_path / "shape", f"{p}.weight_shape", lambda t: torch.tensor([64, 64]))
    with pytest.raises(CheckpointError, match=f"{p}.weight_shape is \\[64, 64\\], expected \\[64, 128\\]"):
        _load(bad)
    bad = _edit(tiny_int4, tmp_path / "scale", f"{p}.weight_scale", lambda t: t[:, :0].contiguous())
    with pytest.raises(CheckpointError, match="weight_scale must be float"):
        _load(bad)
    raw = json.loads((Path(tiny_int4) / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    with pytest.raises(ConfigError, match="actorder"):
        GlmMoeDsaConfig.from_dict(raw)
    raw["quantization_config"]["config_groups"]["group_0"]["weights"].update(actorder=None, num_bits=8)
    with pytest.raises(ConfigError, match="num_bits"):
        GlmMoeDsaConfig.from_dict(raw)
    with pytest.raises(ValueError, match="int4_cache_dir"):
        _load(tiny_int4, int4_cache_dir=tmp_path / "c")
