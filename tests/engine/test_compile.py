"""Compiled layers (engine/compiled.py): the engine's tokens with and without compiled prefill, one graph per layer
kind, the fall-back to eager when compiling fails; compiled decode's forward against the eager one on decode steps
(its CUDA graphs: tests/engine/test_cuda_graphs.py).

On the CPU the engine runs the tiny checkpoint in fp32 (reference attention, torch MoE runner) and the layers are
compiled by Inductor (C++ code, gcc), so compiled steps must give exactly the eager tokens. Prompt lengths and a
16-token budget make compiled steps of many sizes (chunks of long prompts, short prompts, chunks beside decodes)
while 1- to 7-token steps stay eager.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from moed.attention.reference import ReferenceAttention
from moed.engine.compiled import CompiledDecode, CompiledPrefill, layer_kinds
from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import load_model
from moed.offload.torch_runner import TorchMoERunner

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
LENGTHS = (9, 21, 40, 13, 30)
MIN_TOKENS = 8


def _prompts(lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]


def _engine(path: str, **kw) -> LLMEngine:
    kw = {"max_running": 3, "max_tokens_per_step": 16, "page_size": 4, "compile_min_tokens": MIN_TOKENS, **kw}
    return LLMEngine(EngineConfig(model=path, **kw))


def _spy_sizes(compiled: CompiledPrefill) -> list[int]:
    """Record the token count of every step the compiled path takes."""
    sizes: list[int] = []
    forward = compiled.forward

    def spy(model, input_ids, *args):
        sizes.append(int(input_ids.shape[0]))
        return forward(model, input_ids, *args)

    compiled.forward = spy  # type: ignore[method-assign]
    return sizes


@pytest.fixture(scope="module")
def eager_tokens(tiny_checkpoint) -> list[list[int]]:
    e = _engine(tiny_checkpoint, compile_prefill=False)
    assert e.runner.compiled is None
    return e.generate(_prompts(), GREEDY)


def test_engine_compile_prefill_is_off_by_default(tiny_checkpoint):
    assert EngineConfig(model=tiny_checkpoint).compile_prefill is False
    assert LLMEngine(EngineConfig(model=tiny_checkpoint)).runner.compiled is None


def test_engine_compiled_prefill_gives_the_eager_tokens_with_one_graph_per_layer_kind(tiny_checkpoint, eager_tokens):
    e = _engine(tiny_checkpoint, compile_prefill=True)
    compiled = e.runner.compiled
    assert compiled is not None and compiled.min_tokens == MIN_TOKENS
    sizes = _spy_sizes(compiled)
    torch._dynamo.reset()  # graphs of an earlier test would hide this test's compiles
    counters.clear()
    assert e.generate(_prompts(), GREEDY) == eager_tokens
    assert compiled.failed is None
    assert compiled.steps == len(sizes) and len(set(sizes)) >= 3 and min(sizes) >= MIN_TOKENS
    assert e.num_steps > len(sizes)  # decode-only steps (< MIN_TOKENS tokens) ran eagerly
    kinds = layer_kinds(e.model)
    assert len(kinds) == 2 and e.cfg.num_hidden_layers == 4  # dense layer 0; MoE layers 1-3 share a graph
    # One compile per layer kind, whatever the step's size or the layer: no recompiles, no graph breaks.
    assert counters["frames"]["total"] == len(kinds)
    assert counters["stats"]["unique_graphs"] == len(kinds)
    assert sum(counters["graph_break"].values()) == 0
    # Other lengths again: the same graphs serve them.
    e.generate(_prompts((17, 11, 36)), GREEDY)
    assert counters["frames"]["total"] == len(kinds) and compiled.failed is None


class _Boom(RuntimeError):
    pass


def _failing_compiler(fail_on: str):
    """A torch.compile backend: aot_eager, except for the graphs of `fail_on` layers ("dense" or "moe"), which
    raise."""
    from torch._dynamo.backends.registry import lookup_backend

    def compiler(gm, example_inputs):
        has_moe = any(node.target is torch.ops.moed_engine.moe.default for node in gm.graph.nodes)
        if has_moe == (fail_on == "moe"):
            raise _Boom(f"forced compile failure ({fail_on} layer)")
        return lookup_backend("aot_eager")(gm, example_inputs)

    return compiler


@pytest.mark.parametrize("fail_on", ["dense", "moe"])
def test_engine_compile_failure_falls_back_to_eager(tiny_checkpoint, eager_tokens, caplog, fail_on):
    # Dense layer 0 fails before anything ran; an MoE layer fails after layer 0 ran compiled and appended its KV
    # to the reference backend's cache: the eager rerun must see the cache as it was before the step.
    e = _engine(tiny_checkpoint, compile_prefill=True)
    torch._dynamo.reset()
    e.runner.compiled = compiled = CompiledPrefill(MIN_TOKENS, compiler=_failing_compiler(fail_on))
    with caplog.at_level(logging.WARNING, logger="moed.engine.compiled"):
        assert e.generate(_prompts(), GREEDY) == eager_tokens
        assert e.generate(_prompts(), GREEDY) == eager_tokens
    assert compiled.failed is not None and f"forced compile failure ({fail_on} layer)" in compiled.failed
    assert compiled.steps == 0 and e.step_errors == 0
    warnings = [r for r in caplog.records if "compiled prefill off" in r.getMessage()]
    assert len(warnings) == 1


def test_engine_compiled_step_errors_of_the_moe_runner_are_the_steps_own(tiny_checkpoint):
    # An error raised inside the opaque MoE op is not a compile failure: the step fails as it would eagerly and
    # the compiled path stays on.
    e = _engine(tiny_checkpoint, compile_prefill=True)
    torch._dynamo.reset()
    e.runner.compiled = compiled = CompiledPrefill(MIN_TOKENS, compiler="aot_eager")
    real_run = e.runner.moe.run

    def broken(layer, hidden, topk_ids, topk_weights):
        raise _Boom(f"expert store unreachable (layer {layer})")

    e.runner.moe.run = broken  # type: ignore[method-assign]
    e.add_request("r", _prompts((12,))[0], GREEDY)
    outputs = e.step()
    assert [o.request_id for o in outputs] == ["r"] and "expert store unreachable (layer 1)" in outputs[0].error
    assert compiled.failed is None and e.step_errors == 1
    e.runner.moe.run = real_run  # type: ignore[method-assign]
    assert e.generate(_prompts((12,)), GREEDY)[0] and compiled.steps == 1 and compiled.failed is None


def test_engine_compile_min_tokens_is_checked(tiny_checkpoint):
    with pytest.raises(ValueError, match="compile_min_tokens must be >= 1, got 0"):
        _engine(tiny_checkpoint, compile_prefill=True, compile_min_tokens=0)


def _gpu_engine(path: str, **kw) -> LLMEngine:
    base = {"device": "cuda", "max_tokens_per_step": 64, "cuda_graphs": False, "compile_min_tokens": 16}
    return _engine(path, **{**base, **kw})


@pytest.mark.gpu
def test_engine_compiled_prefill_gives_the_eager_tokens_on_gpu(tiny_checkpoint):
    # Triton attention over the paged pool (FP8 index keys), the torch MoE runner (a host sync per layer inside
    # the opaque op), Inductor's Triton code for the rest; fp32 activations, so rounding differences stay far below
    # any greedy margin (in bf16 Inductor's fused rounding flipped a near tie of a tiny-model decode token).
    kw = {"dtype": "fp32", "moe": "torch"}
    prompts = _prompts((20, 47, 90, 33))
    eager = _gpu_engine(tiny_checkpoint, compile_prefill=False, **kw)
    want = eager.generate(prompts, GREEDY)
    assert eager.step_errors == 0 and all(len(t) == GREEDY.max_tokens for t in want)
    e = _gpu_engine(tiny_checkpoint, compile_prefill=True, **kw)
    compiled = e.runner.compiled
    assert compiled is not None
    torch._dynamo.reset()
    counters.clear()
    e.warmup()  # compiles at compile_min_tokens tokens
    kinds = len(layer_kinds(e.model))
    assert compiled.failed is None and counters["frames"]["total"] == kinds
    sizes = _spy_sizes(compiled)
    assert e.generate(prompts, GREEDY) == want and e.step_errors == 0
    assert compiled.failed is None and compiled.steps == len(sizes) and len(set(sizes)) >= 3
    assert counters["frames"]["total"] == kinds  # no recompile for other sizes or layers


@pytest.mark.gpu
def test_engine_compiled_prefill_steps_match_eager_on_gpu_in_bf16(tiny_checkpoint):
    # bf16 with the offload runner, half the experts cached (prefill steps serve misses inside the opaque op):
    # every compiled step against the same step run eagerly right after it (which rewrites the same KV rows).
    e = _gpu_engine(
        tiny_checkpoint,
        compile_prefill=True,
        dtype="bf16",
        moe="offload",
        expert_cache_gb=3 * 8 * 49152 / 2**30,
        miss_service="copy",
    )
    compiled = e.runner.compiled
    assert compiled is not None
    errors: list[tuple[float, float]] = []  # (whole step, median token) relative errors
    forward = compiled.forward

    def checked(model, input_ids, ctx, backend, moe):
        out = forward(model, input_ids, ctx, backend, moe)
        ref = model(input_ids, ctx, backend, moe).float()
        diff = out.float() - ref
        errors.append((float(diff.norm() / ref.norm()), float((diff.norm(dim=1) / ref.norm(dim=1)).median())))
        return out

    compiled.forward = checked  # type: ignore[method-assign]
    tokens = e.generate(_prompts((20, 47, 90, 33)), GREEDY)
    assert e.step_errors == 0 and all(len(t) == GREEDY.max_tokens for t in tokens)
    assert compiled.failed is None and len(errors) >= 3
    # Measured on the H100 (2026-11-23): whole step 0.17-0.22, median token 0.018-0.044 (bf16 rounding, which
    # flips some tokens' router and indexer top-k choices: those tokens move by tens of percent). A wrong layer's
    # weights, a stale KV row or a lost MoE output puts both near 1.
    assert max(w for w, _ in errors) < 0.5 and max(m for _, m in errors) < 0.1, errors


@torch.no_grad()
def test_compiled_decode_forward_matches_eager_on_decode_steps(tiny_checkpoint):
    """What the decode graphs capture with compile_decode: one token per sequence after a prompt, at batch 1 (its
    own specialised graph) and 3 then 2 (one dynamic graph), against the eager forward on the same step (fp32)."""
    cfg = GlmMoeDsaConfig.from_file(Path(tiny_checkpoint) / "config.json")
    moe = TorchMoERunner(cfg, torch.float32)
    model = load_model(tiny_checkpoint, moe, dtype=torch.float32, config=cfg)
    backend = ReferenceAttention(cfg)
    compiled = CompiledDecode()
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(5)
    for batch in (1, 3, 2):
        lengths = [int(n) for n in torch.randint(5, 40, (batch,), generator=g)]
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
        kvs = [backend.new_sequence() for _ in prompts]
        model(
            torch.cat(prompts),
            StepContext(
                positions=torch.cat([torch.arange(n) for n in lengths]),
                seqs=[SequenceStep(0, n, kv) for n, kv in zip(lengths, kvs)],
            ),
            backend,
            moe,
        )
        ids = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
        ctx = StepContext(positions=torch.tensor(lengths), seqs=[SequenceStep(n, 1, kv) for n, kv in zip(lengths, kvs)])
        got = compiled(model, ids, ctx, backend, moe)
        for kv, n in zip(kvs, lengths):
            kv.truncate(n)  # the eager run below appends the same token again
        want = model(ids, ctx, backend, moe)
        assert got.shape == want.shape == (batch, cfg.hidden_size)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (batch, (got - want).abs().max().item())
    kinds = len(layer_kinds(model))
    assert sum(counters["graph_break"].values()) == 0
    # batch 1 specialised, batches 3 and 2 one dynamic graph: per layer kind, never per layer or per size
    assert counters["stats"]["unique_graphs"] == 2 * kinds
