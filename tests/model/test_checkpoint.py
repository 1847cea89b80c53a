"""Checkpoint generation and loading: layout, determinism, FP8 format, and clear load errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moed.attention.reference import ReferenceAttention
from moed.formats.fp8 import dequantize_block_fp8, quantize_block_fp8
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.checkpoint import make_checkpoint, make_config, tensor_specs
from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import CheckpointError, load_model
from moed.offload.torch_runner import TorchMoERunner


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load(path) -> None:
    cfg = GlmMoeDsaConfig.from_file(Path(path) / "config.json")
    load_model(path, TorchMoERunner(cfg, torch.float32), config=cfg)


def test_layout_matches_release(tiny_checkpoint):
    d = Path(tiny_checkpoint)
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    ):
        assert (d / f).exists(), f
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1, "the tiny preset is sharded so multi-shard loading is exercised"
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in index["weight_map"]
    assert "model.layers.1.self_attn.indexer.weights_proj.weight" in index["weight_map"]
    assert "model.layers.4.eh_proj.weight" in index["weight_map"]  # the MTP layer after 4 main layers
    total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert index["metadata"]["total_size"] <= total


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = make_checkpoint(tmp_path / "a", "tiny", seed=3, device="cpu")
    b = make_checkpoint(tmp_path / "b", "tiny", seed=3, device="cpu")
    c = make_checkpoint(tmp_path / "c", "tiny", seed=4, device="cpu")
    name = "model-00002-of-00005.safetensors"
    ta, tb, tc = (load_file(str(p / name)) for p in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_fp8_checkpoint_format(tiny_fp8_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(Path(tiny_fp8_checkpoint) / "config.json")
    index = json.loads((Path(tiny_fp8_checkpoint) / "model.safetensors.index.json").read_text())
    wmap = index["weight_map"]

    def get(name):
        with safe_open(str(Path(tiny_fp8_checkpoint) / wmap[name]), "pt") as f:
            return f.get_tensor(name)

    w = get("model.layers.1.mlp.experts.0.down_proj.weight")
    s = get("model.layers.1.mlp.experts.0.down_proj.weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (math.ceil(cfg.hidden_size / 128), math.ceil(cfg.moe_intermediate_size / 128))
    # modules_to_not_convert stay in bf16/fp32
    assert get("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert get("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert get("model.layers.1.self_attn.indexer.weights_proj.weight").dtype == torch.bfloat16
    assert "lm_head.weight_scale_inv" not in wmap


def test_fp8_block_quantisation_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)  # partial edge blocks in both dims
    q, s = quantize_block_fp8(w, 128, 128)
    assert q.shape == w.shape and s.shape == (3, 2)
    back = dequantize_block_fp8(q, s, 128, 128)
    assert ((back - w).norm() / w.norm()).item() < 0.04  # e4m3 has a 3-bit mantissa
    # element (i, j) uses block (i // 128, j // 128)
    assert torch.allclose(back[200, 150], q[200, 150].float() * s[1, 1])


def test_glm51_slice_has_real_layer_dimensions():
    cfg = GlmMoeDsaConfig.from_dict(make_config("glm51-slice", layers=2, fp8=True))
    specs = {s.name: s for s in tensor_specs(cfg)}
    assert specs["model.layers.1.mlp.experts.255.gate_proj.weight"].shape == (2048, 6144)
    assert specs["model.layers.0.self_attn.q_b_proj.weight"].shape == (64 * 256, 2048)
    assert specs["model.layers.0.self_attn.kv_b_proj.weight"].shape == (64 * (192 + 256), 512)
    assert specs["model.layers.0.self_attn.indexer.wq_b.weight"].shape == (32 * 128, 2048)
    expert_bytes = 3 * 2048 * 6144
    assert abs(expert_bytes / 1e6 - 37.7) < 0.1  # DESIGN.md: one expert ~37.7 MB in FP8


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "ck")
    (d / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00003-of-00005\.safetensors.*missing"):
        _load(d)


def test_truncated_shard_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "ck")
    shard = d / "model-00002-of-00005.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00005\.safetensors: truncated shard"):
        _load(d)


def test_wrong_tensor_shape_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "ck")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    shard = d / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {name} has shape .* expected"):
        _load(d)


def test_wrong_expert_shape_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "ck")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.3.mlp.experts.5.down_proj.weight"
    shard = d / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape"):
        _load(d)


def test_missing_tensor_and_missing_scale_are_named(tiny_fp8_checkpoint, tmp_path):
    d = _copy(tiny_fp8_checkpoint, tmp_path / "ck")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    shard = d / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{name} is missing"):
        _load(d)


def test_mtp_layer_runs_a_draft_step(tiny_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(Path(tiny_checkpoint) / "config.json")
    runner = TorchMoERunner(cfg, torch.float32)
    model = load_model(tiny_checkpoint, runner, config=cfg)
    be = ReferenceAttention(cfg)
    ids = torch.randint(0, cfg.vocab_size, (6,), generator=torch.Generator().manual_seed(0))
    ctx = StepContext(torch.arange(6), [SequenceStep(0, 6, be.new_sequence())])
    with torch.no_grad():
        hidden = model(ids, ctx, be, runner)
        logits, h = model.mtp_forward(0, torch.roll(ids, -1), hidden, ctx, be, runner)
    assert logits.shape == (6, cfg.vocab_size) and h.shape == (6, cfg.hidden_size)
    assert torch.isfinite(logits).all()
    assert 4 in runner.weights  # the MTP layer's routed experts went to the runner too


def test_cli_generate_prints_text(tiny_checkpoint):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moed.daemon.cli",
            "generate",
            "--model",
            tiny_checkpoint,
            "--max-tokens",
            "16",
            "--ignore-eos",
            "Hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0


def test_cli_reports_bad_checkpoint_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "moed.daemon.cli", "generate", "--model", str(tmp_path), "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "config.json" in r.stderr and "Traceback" not in r.stderr


def test_glm51_preset_is_the_whole_model_with_fewer_experts():
    from moed.model.checkpoint import checkpoint_bytes

    cfg = GlmMoeDsaConfig.from_dict(make_config("glm51", experts=8, fp8=True))
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_nextn_predict_layers) == (78, 3, 1)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok) == (154880, 6144, 8, 8)
    specs = {s.name for s in tensor_specs(cfg)}
    assert "model.layers.78.eh_proj.weight" in specs and "model.layers.2.mlp.gate_proj.weight" in specs
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in specs
    b = checkpoint_bytes(cfg)
    # 75 MoE layers x 8 experts x ~37.7 MB; the MTP layer's 8 experts count as routed experts too
    assert b["routed_experts"] == pytest.approx(76 * 8 * 37.76e6, rel=0.01)
    assert 43e9 < sum(b.values()) < 46e9  # DEVICE-NOTES: a 78-layer 8-expert checkpoint is ~42 GiB
    full = checkpoint_bytes(GlmMoeDsaConfig.from_dict(make_config("glm51", fp8=True)))
    assert full["routed_experts"] / 1e9 == pytest.approx(76 * 256 * 37.76e-3, rel=0.01)  # ~735 GB (DESIGN.md §1)


def test_checkpoint_bytes_match_the_files_written(tmp_path):
    from moed.model.checkpoint import checkpoint_bytes

    out = make_checkpoint(tmp_path / "ck", "tiny", dtype="fp8", seed=0, device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    cfg = GlmMoeDsaConfig.from_file(out / "config.json")
    assert sum(checkpoint_bytes(cfg).values()) == index["metadata"]["total_size"]
