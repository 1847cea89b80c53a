"""fp8_projections: an FP8 checkpoint's projections stay FP8 (`Fp8Linear`) and give what the dequantised ones give;
the op the engine installs on a GPU, on the CPU and under torch.compile; the engine's tokens both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moed.attention.reference import ReferenceAttention
from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams
from moed.formats.fp8 import quantize_block_fp8
from moed.kernels import fp8_linear as f8l
from moed.kernels import torch_ops
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.config import GlmMoeDsaConfig
from moed.model.glm import Fp8Linear
from moed.model.weights import load_model
from moed.offload.torch_runner import TorchMoERunner


def _load(path: str, fp8: bool):
    cfg = GlmMoeDsaConfig.from_file(Path(path) / "config.json")
    runner = TorchMoERunner(cfg, torch.float32)
    return load_model(path, runner, dtype=torch.float32, config=cfg, fp8_projections=fp8), runner


def test_fp8_projections_stay_fp8_and_give_the_dequantised_outputs(tiny_fp8_checkpoint):
    plain, runner = _load(tiny_fp8_checkpoint, fp8=False)
    kept, _ = _load(tiny_fp8_checkpoint, fp8=True)
    fp8 = {n: m for n, m in kept.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8.values())
    assert any(n.endswith("o_proj") for n in fp8) and any(n.endswith("shared_experts.down_proj") for n in fp8)
    # the attention backend reads kv_b_proj's weight as a matrix: dequantised as before
    assert not any(n.endswith("kv_b_proj") for n in fp8)
    assert kept.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.float32
    size = {k: sum(p.numel() * p.element_size() for p in m.parameters()) for k, m in (("p", plain), ("k", kept))}
    assert size["k"] < 0.6 * size["p"]  # fp32 here: FP8 is a quarter of those projections' bytes

    cfg = plain.cfg
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    out = []
    for model in (plain, kept):
        backend = ReferenceAttention(cfg)
        ctx = StepContext(positions=torch.arange(12), seqs=[SequenceStep(0, 12, backend.new_sequence())])
        with torch.no_grad():
            out.append(model(ids, ctx, backend, runner))
    # the same dequantised fp32 weights either way, multiplied in the same order
    assert torch.equal(out[0], out[1])


def test_fp8_linear_op_on_cpu_and_under_compile():
    w, s = quantize_block_fp8(torch.randn(96, 256), 128, 128)
    x = torch.randn(5, 256)
    want = f8l.fp8_linear(x, w, s)
    assert torch.equal(torch_ops.fp8_linear(x, w, s, (128, 128)), want)
    compiled = torch.compile(lambda a: torch_ops.fp8_linear(a, w, s, (128, 128)) * 2, backend="aot_eager")
    assert torch.equal(compiled(x), want * 2)
    with pytest.raises(ValueError, match="scale must be fp32"):
        torch_ops.fp8_linear(x, w, s[:, :1], (128, 128))


def test_engine_fp8_projections_keep_the_greedy_tokens(tiny_fp8_checkpoint):
    prompts = [[5, 17, 300, 42, 9], list(range(20, 60))]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    want = LLMEngine(EngineConfig(model=tiny_fp8_checkpoint, dtype="fp32")).generate(prompts, sp)
    e = LLMEngine(EngineConfig(model=tiny_fp8_checkpoint, dtype="fp32", fp8_projections=True))
    assert any(isinstance(m, Fp8Linear) for m in e.model.modules())
    assert e.generate(prompts, sp) == want


@pytest.mark.gpu
def test_engine_fp8_projections_on_gpu_in_graphs(tiny_fp8_checkpoint):
    """bf16 on the GPU: the w8a16 op serves decode (in CUDA graphs) and small steps, the dequantised GEMM long ones;
    against the bf16-dequantised projections, greedy tokens of a random tiny model may flip on near ties, so the
    check is the steps' hidden states: every replay against eager, and a prefill's logits against the plain path."""
    base = {"model": tiny_fp8_checkpoint, "device": "cuda", "dtype": "bf16", "max_running": 4, "page_size": 4}
    base |= {"moe": "offload", "miss_service": "copy"}  # the torch runner syncs: it would keep graphs off
    prompt = list(range(20, 90))
    plain = LLMEngine(EngineConfig(**base))
    e = LLMEngine(EngineConfig(**base, fp8_projections=True))
    assert all(m.matmul is torch_ops.fp8_linear for m in e.model.modules() if isinstance(m, Fp8Linear))
    e.warmup()
    assert e.runner.graphs is not None, "graphs off (see the log)"
    out = e.generate([prompt, prompt[:9]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(len(o) == 8 for o in out) and e.step_errors == 0 and e.runner.graph_steps > 0
    # bf16 rounding alone moves this random tiny model's logits ~15% from fp32 (CPU: 0.146), so the w8a16 path is
    # held to the plain bf16 path's own error against fp32 logits of the same weights
    exact, runner = _load(tiny_fp8_checkpoint, fp8=False)
    logits = [_prefill_logits(exact, runner, prompt[:40], "cpu")]
    logits += [_prefill_logits(eng.model, eng.runner.moe, prompt[:40], "cuda").cpu() for eng in (plain, e)]
    err_plain, err_fp8 = (float((x - logits[0]).norm() / logits[0].norm()) for x in logits[1:])
    assert err_fp8 < 1.25 * err_plain + 0.01, (err_fp8, err_plain)


def _prefill_logits(model, moe, prompt: list[int], device: str) -> torch.Tensor:
    backend = ReferenceAttention(model.cfg)
    n = len(prompt)
    ids = torch.tensor(prompt, device=device)
    ctx = StepContext(positions=torch.arange(n, device=device), seqs=[SequenceStep(0, n, backend.new_sequence())])
    with torch.no_grad():
        return model.logits(model(ids, ctx, backend, moe)).float()
