"""Compiled decoder layers: large eager steps (prefill), and optionally the decode CUDA graphs, run each decoder
layer through one torch.compile'd function.

What is compiled: `DecoderLayer.forward` of model/glm.py as it is (norms, projections, rotary, the
indexer's projections, the router, the shared expert, residuals), once for every layer of a kind,
with a dynamic token count (`dynamic=True`), so prompts of any length reuse one graph. The embedding,
the rotary tables and the final norm run eagerly around the layers.

What stays opaque, as one custom op each with a fake implementation for tracing:
  moed_engine::attend  the attention backend's whole `attend` (KV write into the paged pool, indexer scores,
                       top-k, sparse or dense MLA). Its pool and the step's context are not arguments:
                       the op reads them from the forward context set around the step (vLLM's and sglang's
                       split for piecewise graphs), so the compiler never sees the pool and never copies it;
                       the op also keeps the previous layer's top-k there, which shared-indexer layers read.
  moed_engine::moe     the MoE runner's `run` for the layer: any runner (resident, offload, hybrid CPU
                       experts) works unchanged, host syncs and Python loops included, since the compiled
                       code calls it as an ordinary function between its kernels.
The ops drop the layer index the layer hands its backend and runner and read it from the forward context
instead: an int argument of an op is specialised, which would compile one graph per layer. So dynamo makes one
graph per layer *kind* (dense MLP vs MoE; own vs shared indexer), whatever the number of layers.

A compile error (dynamo, Inductor, a missing C++ compiler) does not fail the step: it is logged once, the
step is run again eagerly, and every later step stays eager. The eager rerun repeats what the failed call
did before it stopped: a paged pool gets the same KV rows written again, a growing cache (the reference
backend's) is truncated back first; expert-cache statistics count that step's earlier layers twice.
An error raised by the attention or MoE code inside the ops is the step's own and propagates as in eager.

Compiled decode (`CompiledDecode`, engine setting compile_decode): the decode graphs capture the compiled layers
instead of the eager ones. At batch 1 a decode step is thousands of tiny kernels (each RMSNorm alone is six: casts,
pow, mean, rsqrt, two multiplies), and a CUDA graph replays each as its own node; Inductor fuses the elementwise
work between the projections, the attention op and the MoE op. It is a separate compiled function, so its graphs
(batch 1 is specialised; every other bucket shares one dynamic graph per layer kind) never count against
prefill's. Compiling happens in the graphs' warm-up runs, before capture; a failure there is the caller's to handle
(the engine captures eager graphs instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from moed.model.attention_interface import AttentionBackend, IndexerInputs, LayerWeights, MLAInputs, StepContext
from moed.model.glm import GlmMoeDsaForCausalLM
from moed.model.moe import MoERunner

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ForwardContext:
    """What the opaque ops read outside the graph, set for the duration of one step."""

    backend: AttentionBackend
    moe: MoERunner
    ctx: StepContext
    layer: int = -1  # the layer being run, set before each compiled call
    topk: torch.Tensor | None = None  # the last layer's selection: the next layer's prev_topk
    op_failed: bool = False  # an op's own code raised: the step's error, not the compiler's


_FORWARD: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(fc: ForwardContext) -> Iterator[ForwardContext]:
    global _FORWARD
    saved, _FORWARD = _FORWARD, fc
    try:
        yield fc
    finally:
        _FORWARD = saved


def _current() -> ForwardContext:
    if _FORWARD is None:
        raise RuntimeError("moed_engine ops run only inside a compiled forward (no forward context is set)")
    return _FORWARD


@torch.library.custom_op("moed_engine::attend", mutates_args=())
def attend_op(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    index_q: torch.Tensor | None,
    index_k: torch.Tensor | None,
    index_w: torch.Tensor | None,
    kv_b_proj: torch.Tensor,
) -> torch.Tensor:
    """The current layer's backend.attend -> out [tokens, heads * v_head_dim]; the top-k stays in the context."""
    fc = _current()
    try:
        indexer = None if index_q is None else IndexerInputs(q=index_q, k=index_k, weights=index_w)
        out, fc.topk = fc.backend.attend(
            fc.layer,
            LayerWeights(kv_b_proj=kv_b_proj),
            MLAInputs(q_nope=q_nope, q_rope=q_rope, latent=latent, k_rope=k_rope),
            indexer,
            fc.topk,
            fc.ctx,
        )
    except Exception:
        fc.op_failed = True
        raise
    return out.contiguous()  # the compiled code indexes the result with the fake's (contiguous) strides


@attend_op.register_fake
def _(q_nope, q_rope, latent, k_rope, index_q, index_k, index_w, kv_b_proj):
    T, H, dn = q_nope.shape
    return q_nope.new_empty((T, kv_b_proj.shape[0] - H * dn))  # kv_b_proj: [H * (dn + dv), kv_lora_rank]


@torch.library.custom_op("moed_engine::moe", mutates_args=())
def moe_op(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The current layer's routed experts: MoE runner.run -> [tokens, hidden_size]."""
    fc = _current()
    try:
        return fc.moe.run(fc.layer, hidden, topk_ids, topk_weights).contiguous()
    except Exception:
        fc.op_failed = True
        raise


@moe_op.register_fake
def _(hidden, topk_ids, topk_weights):
    return torch.empty_like(hidden)


class _OpaqueAttention:
    """The backend the compiled layer sees: attend is one op; layer, prev_topk and ctx come from the context."""

    def attend(
        self,
        layer: int,
        weights: LayerWeights,
        mla: MLAInputs,
        indexer: IndexerInputs | None,
        prev_topk: torch.Tensor | None,
        ctx: Any,
    ) -> tuple[torch.Tensor, None]:
        iq, ik, iw = (None, None, None) if indexer is None else (indexer.q, indexer.k, indexer.weights)
        return attend_op(mla.q_nope, mla.q_rope, mla.latent, mla.k_rope, iq, ik, iw, weights.kv_b_proj), None


class _OpaqueMoE:
    """The MoE runner the compiled layer sees: run is one op; the layer comes from the context."""

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return moe_op(hidden, topk_ids, topk_weights)


_ATTENTION, _MOE = _OpaqueAttention(), _OpaqueMoE()


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, hidden_size] -> the layer's output (the compiled function; `layer` is a DecoderLayer)."""
    return layer(x, cos, sin, _ATTENTION, _MOE, None, None)[0]


def _decode_layer_step(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The decode graphs' compiled function: its own code object, so its graphs have their own recompile budget."""
    return _layer_step(layer, x, cos, sin)


def _run_layers(
    layer_fn: Callable, fc: ForwardContext, model: GlmMoeDsaForCausalLM, input_ids: torch.Tensor
) -> torch.Tensor:
    """GlmMoeDsaForCausalLM.forward with `layer_fn` for each main layer -> final-normed hidden [tokens, hidden]."""
    with forward_context(fc):
        cos, sin = model._rope(fc.ctx)
        x = model.model.embed_tokens(input_ids)
        for i, layer in enumerate(model.model.layers[: model.cfg.num_hidden_layers]):
            fc.layer = i
            x = layer_fn(layer, x, cos, sin)
        return model.model.norm(x)


def layer_kinds(model: GlmMoeDsaForCausalLM) -> set[tuple[str, bool]]:
    """The main layers' kinds, (MLP class, has its own indexer): one compiled graph each."""
    layers = model.model.layers[: model.cfg.num_hidden_layers]
    return {(type(layer.mlp).__name__, layer.self_attn.indexer is not None) for layer in layers}


class CompiledPrefill:
    """The compiled path of `ModelRunner.run` for eager steps of at least `min_tokens` tokens.

    `compiler` is torch.compile's backend ("inductor"; "aot_eager" traces and partitions without generating code).
    """

    def __init__(self, min_tokens: int, compiler: str | Callable = "inductor") -> None:
        if min_tokens < 1:
            raise ValueError(f"compile_min_tokens must be >= 1, got {min_tokens}")
        self.min_tokens = min_tokens
        self.layer_fn = torch.compile(_layer_step, dynamic=True, backend=compiler)
        self.failed: str | None = None  # why the compiled path is off for good
        self.steps = 0  # steps served compiled (stats, tests)

    def covers(self, num_tokens: int) -> bool:
        return self.failed is None and num_tokens >= self.min_tokens

    def forward(
        self,
        model: GlmMoeDsaForCausalLM,
        input_ids: torch.Tensor,
        ctx: StepContext,
        backend: AttentionBackend,
        moe: MoERunner,
    ) -> torch.Tensor | None:
        """GlmMoeDsaForCausalLM.forward with compiled layers -> final-normed hidden [tokens, hidden_size];
        None when compiling failed (logged once; the caller runs the step eagerly)."""
        fc = ForwardContext(backend, moe, ctx)
        try:
            hidden = _run_layers(self.layer_fn, fc, model, input_ids)
        except Exception as e:
            if fc.op_failed:
                raise
            for seq in ctx.seqs:  # a growing cache (the reference backend's) forgets what the partial call appended
                truncate = getattr(seq.kv, "truncate", None)
                if truncate is not None:
                    truncate(seq.num_cached)
            self.failed = describe_failure(e)
            log.warning(
                "compiled prefill off, running eagerly from now on: compiling the decoder layer failed (%s)",
                self.failed,
                exc_info=True,
            )
            return None
        self.steps += 1
        return hidden


class CompiledDecode:
    """The decode graphs' forward: `GlmMoeDsaForCausalLM.forward` with compiled layers, called in the graphs'
    warm-up (which compiles) and capture; errors propagate (compiling or the step's own)."""

    def __init__(self, compiler: str | Callable = "inductor") -> None:
        self.layer_fn = torch.compile(_decode_layer_step, dynamic=True, backend=compiler)

    def __call__(
        self,
        model: GlmMoeDsaForCausalLM,
        input_ids: torch.Tensor,
        ctx: StepContext,
        backend: AttentionBackend,
        moe: MoERunner,
    ) -> torch.Tensor:
        return _run_layers(self.layer_fn, ForwardContext(backend, moe, ctx), model, input_ids)


def describe_failure(e: BaseException) -> str:
    """The error and its root cause (dynamo wraps a backend's error in BackendCompilerFailed), first lines only."""
    root = e
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
        root = inner
    first_line = (str(root).strip().splitlines() or [""])[0]
    chain = type(e).__name__ if root is e else f"{type(e).__name__} <- {type(root).__name__}"
    return f"{chain}: {first_line}"
