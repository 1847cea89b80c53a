"""KV-cached decode equals full recompute at every step, with sparse selection active."""

from __future__ import annotations

import pytest
import torch

from moed.attention.reference import ReferenceAttention
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.checkpoint import make_checkpoint
from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import load_model
from moed.offload.torch_runner import TorchMoERunner


def _load(path):
    cfg = GlmMoeDsaConfig.from_file(f"{path}/config.json")
    runner = TorchMoERunner(cfg, torch.float32)
    return cfg, load_model(path, runner, dtype=torch.float32, config=cfg), runner


@torch.no_grad()
def _check_cached_equals_recompute(path, prompt_len, steps):
    cfg, model, runner = _load(path)
    be = ReferenceAttention(cfg)
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(0, cfg.vocab_size, (prompt_len + steps,), generator=g)
    kv = be.new_sequence()
    # Prefill in two chunks (chunked prefill must also match), then one token per step.
    cut = prompt_len // 2
    chunks = [(0, cut), (cut, prompt_len)] + [(i, i + 1) for i in range(prompt_len, prompt_len + steps)]
    for start, end in chunks:
        ctx = StepContext(positions=torch.arange(start, end), seqs=[SequenceStep(start, end - start, kv)])
        cached = model.logits(model(ids[start:end], ctx, be, runner))[-1]
        full_ctx = StepContext(positions=torch.arange(end), seqs=[SequenceStep(0, end, be.new_sequence())])
        full = model.logits(model(ids[:end], full_ctx, be, runner))[-1]
        assert ((cached - full).abs().max() / full.abs().max()).item() < 1e-5, (start, end)


def test_kv_cached_decode_equals_full_recompute(tiny_checkpoint):
    # The tiny model's index_topk is 16: steps cross from dense (all positions) to sparse selection.
    _check_cached_equals_recompute(tiny_checkpoint, prompt_len=12, steps=12)


def test_kv_cached_decode_with_shared_indexer_layers(tmp_path):
    path = make_checkpoint(tmp_path / "shared", "tiny", device="cpu", config_overrides={"index_topk_pattern": "FSFS"})
    _check_cached_equals_recompute(str(path), prompt_len=20, steps=6)


def test_parity_shared_indexer_layers_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = str(
        make_checkpoint(tmp_path / "shared", "tiny", device="cpu", config_overrides={"index_topk_pattern": "FSSF"})
    )
    cfg, model, runner = _load(path)
    assert cfg.indexer_types == ("full", "shared", "shared", "full")
    be = ReferenceAttention(cfg)
    ids = torch.randint(0, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.logits(
            model(ids, StepContext(torch.arange(50), [SequenceStep(0, 50, be.new_sequence())]), be, runner)
        )
        hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ref = hf(ids[None]).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
