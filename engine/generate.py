"""Single-prompt generation with an incremental KV cache: what `moed generate` runs.

It drives the network directly (one sequence, reference attention, torch MoE runner): prefill
the prompt in one step, then one token per step reusing the cache. The serving path is the
engine's scheduler; this exists so a newcomer sees text from a checkpoint with one command.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moed.attention.reference import ReferenceAttention
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.config import ExpertDtype, GlmMoeDsaConfig
from moed.model.glm import GlmMoeDsaForCausalLM
from moed.model.weights import load_model
from moed.offload.torch_runner import TorchMoERunner


@dataclass
class LoadedModel:
    cfg: GlmMoeDsaConfig
    model: GlmMoeDsaForCausalLM
    backend: ReferenceAttention
    runner: TorchMoERunner
    device: torch.device


def load(model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
         expert_dtype: ExpertDtype = "checkpoint", int4_cache_dir: str | Path | None = None) -> LoadedModel:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg = GlmMoeDsaConfig.from_file(Path(model_dir) / "config.json")
    runner = TorchMoERunner(cfg, dtype, dev, expert_dtype)
    model = load_model(model_dir, runner, dtype=dtype, device=dev, mtp=False, config=cfg, expert_dtype=expert_dtype,
                       int4_cache_dir=int4_cache_dir)
    return LoadedModel(cfg, model, ReferenceAttention(cfg), runner, dev)


@torch.no_grad()
def generate_ids(m: LoadedModel, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yields new token ids one by one; stops at max_tokens or a stop id (which is yielded)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    if max(prompt_ids) >= m.cfg.vocab_size or min(prompt_ids) < 0:
        raise ValueError(f"prompt token ids must be in [0, {m.cfg.vocab_size})")
    gen = torch.Generator(device=m.device)
    gen.manual_seed(seed if seed is not None else int(time.time_ns()))
    kv = m.backend.new_sequence()
    ids = torch.tensor(prompt_ids, device=m.device)
    cached = 0
    for _ in range(max_tokens):
        n = ids.shape[0]
        ctx = StepContext(positions=torch.arange(cached, cached + n, device=m.device),
                          seqs=[SequenceStep(num_cached=cached, num_new=n, kv=kv)])
        hidden = m.model(ids, ctx, m.backend, m.runner)
        logits = m.model.logits(hidden[-1:]).float()[0]
        cached += n
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        yield token
        if stop_ids and token in stop_ids:
            return
        ids = torch.tensor([token], device=m.device)


def stream_text(decode: Callable[[list[int]], str], token_ids: Iterator[int]) -> Iterator[str]:
    """Text deltas from a token stream; holds back a tail that is an incomplete UTF-8 sequence."""
    ids: list[int] = []
    emitted = ""
    for t in token_ids:
        ids.append(t)
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[len(emitted):]
        emitted = text
    text = decode(ids)
    if len(text) > len(emitted):
        yield text[len(emitted):]
