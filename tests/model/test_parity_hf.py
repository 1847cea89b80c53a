"""Parity with transformers' GlmMoeDsaForCausalLM on the same random checkpoint (fp32)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moed.attention.reference import ReferenceAttention
from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.config import GlmMoeDsaConfig
from moed.model.glm import GlmMoeDsaForCausalLM
from moed.model.weights import load_model
from moed.offload.torch_runner import TorchMoERunner

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@dataclass
class Ours:
    """The network alone (reference attention, torch MoE runner), for logits; greedy continuations go through the
    serving engine instead."""

    path: str
    cfg: GlmMoeDsaConfig
    model: GlmMoeDsaForCausalLM
    backend: ReferenceAttention
    runner: TorchMoERunner


def _ours(path: str) -> Ours:
    cfg = GlmMoeDsaConfig.from_file(Path(path) / "config.json")
    runner = TorchMoERunner(cfg, torch.float32)
    model = load_model(path, runner, dtype=torch.float32, config=cfg)
    return Ours(path, cfg, model, ReferenceAttention(cfg), runner)


def _hf(path: str):
    return transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _our_logits(m: Ours, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[0]
    ctx = StepContext(positions=torch.arange(n), seqs=[SequenceStep(0, n, m.backend.new_sequence())])
    return m.model.logits(m.model(ids, ctx, m.backend, m.runner))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return _ours(tiny_checkpoint), _hf(tiny_checkpoint)


@pytest.mark.parametrize("length_vs_topk", [0.5, 1.0, 5.0])
def test_parity_logits(pair, length_vs_topk):
    ours, hf = pair
    n = int(ours.cfg.index_topk * length_vs_topk)
    ids = torch.randint(0, ours.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert _rel(_our_logits(ours, ids), ref) <= TOL


def test_parity_batch_of_sequences(pair):
    """Several sequences packed into one step give each its own logits."""
    ours, hf = pair
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, ours.cfg.vocab_size, (n,), generator=g) for n in (5, 40, 17)]
    ctx = StepContext(
        positions=torch.cat([torch.arange(s.shape[0]) for s in seqs]),
        seqs=[SequenceStep(0, s.shape[0], ours.backend.new_sequence()) for s in seqs],
    )
    with torch.no_grad():
        packed = ours.model.logits(ours.model(torch.cat(seqs), ctx, ours.backend, ours.runner))
        start = 0
        for s in seqs:
            ref = hf(s[None]).logits[0]
            assert _rel(packed[start : start + s.shape[0]], ref) <= TOL
            start += s.shape[0]


def test_parity_greedy_32_tokens(pair):
    """The serving engine (scheduler, KV pages, sampler; fp32 on the CPU) continues as transformers does."""
    ours, hf = pair
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, ours.cfg.vocab_size, (ours.cfg.index_topk + 3,), generator=g)
    engine = LLMEngine(EngineConfig(model=ours.path, device="cpu", dtype="fp32"))
    [mine] = engine.generate([prompt.tolist()], SamplingParams(max_tokens=32, ignore_eos=True))
    with torch.no_grad():
        out = hf.generate(
            prompt[None], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=32
        )
    assert mine == out[0, prompt.shape[0] :].tolist()


def _dequantize_checkpoint(src: str, dst: Path) -> None:
    """An independent elementwise dequantisation of an FP8 checkpoint into an fp32 one."""
    dst.mkdir()
    cfg = json.loads((Path(src) / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    (dst / "config.json").write_text(json.dumps(cfg))
    index = json.loads((Path(src) / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(Path(src) / shard))
        out = {}
        for name, t in tensors.items():
            if name.endswith("weight_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                s = tensors[name.removesuffix(".weight") + ".weight_scale_inv"]
                rows = torch.arange(t.shape[0])[:, None] // block[0]
                cols = torch.arange(t.shape[1])[None, :] // block[1]
                t = t.float() * s[rows, cols]
            out[name] = t.float().contiguous()
            new_map[name] = shard
        save_file(out, str(dst / shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))


def test_parity_fp8_against_dequantised_reference(tiny_fp8_checkpoint, tmp_path):
    # transformers' FP8 loader derives block sizes from the scale grid, which is wrong for dims that are not
    # multiples of 128 (the tiny model's): so the oracle is transformers on an independently dequantised copy.
    ours = _ours(tiny_fp8_checkpoint)
    _dequantize_checkpoint(tiny_fp8_checkpoint, tmp_path / "deq")
    hf = _hf(str(tmp_path / "deq"))
    ids = torch.randint(0, ours.cfg.vocab_size, (3 * ours.cfg.index_topk,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert _rel(_our_logits(ours, ids), ref) <= TOL
