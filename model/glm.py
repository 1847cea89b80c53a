"""The GLM-5.1 network (`GlmMoeDsaForCausalLM`) in plain PyTorch.

Parameter names are the checkpoint's own (`model.layers.3.self_attn.q_a_proj.weight`, ...), so
loading is a name-for-name copy. Routed experts are not parameters here: they go to the MoE runner.
Attention goes through an attention backend. Both interfaces are given at forward time, so the same
module runs the reference path (CPU, tests) and the kernel paths.

MTP (NextN) layers sit after the main layers under `model.layers.{num_hidden_layers + i}` with
`enorm`, `hnorm`, `eh_proj`, a full decoder layer and `shared_head.norm`; `embed_tokens` and
`shared_head.head` are optional there and fall back to the main model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moed.formats.fp8 import linear_dequantized
from moed.model.attention_interface import AttentionBackend, IndexerInputs, LayerWeights, MLAInputs, StepContext
from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import MoERunner, route
from moed.model.rope import apply_rope_interleaved, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then the weight multiplies the input-dtype result (as the reference does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Fp8Linear(nn.Module):
    """A bias-free projection kept as the checkpoint stores it: `weight` [out, in] float8_e4m3fn and
    `weight_scale_inv` fp32, one scale per `block` (bn, bk) of the weight. The product is `matmul`: by default the
    weight dequantised into the activations' dtype; the engine installs moed's w8a16 op on a GPU, which reads the
    FP8 bytes (half bf16's) directly."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        self.block = block
        self.matmul = linear_dequantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.weight_scale_inv, self.block)


def _linear(i: int, o: int, bias: bool = False) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, device="meta")


class Indexer(nn.Module):
    """DSA indexer projections: the scores and top-k are the attention backend's."""

    def __init__(self, cfg: GlmMoeDsaConfig) -> None:
        super().__init__()
        self.wq_b = _linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.wk = _linear(cfg.hidden_size, cfg.index_head_dim)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim, eps=1e-6, device="meta")
        self.weights_proj = _linear(cfg.hidden_size, cfg.index_n_heads)  # kept in fp32 by the loader


class MLAAttention(nn.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H = cfg.num_attention_heads
        self.q_a_proj = _linear(cfg.hidden_size, cfg.q_lora_rank, cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
        self.q_b_proj = _linear(cfg.q_lora_rank, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = _linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = _linear(H * cfg.v_head_dim, cfg.hidden_size, cfg.attention_bias)
        # Layers past the main stack (MTP) always run their own indexer.
        full = layer >= cfg.num_hidden_layers or cfg.indexer_types[layer] == "full"
        self.indexer = Indexer(cfg) if full else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        ctx: StepContext,
        prev_topk: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        T, H = x.shape[0], cfg.num_attention_heads
        q_resid = self.q_a_layernorm(self.q_a_proj(x))  # [T, q_lora_rank]
        q = self.q_b_proj(q_resid).view(T, H, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)
        k_rope = apply_rope_interleaved(k_rope[:, None, :], cos, sin)[:, 0]
        mla = MLAInputs(q_nope=q_nope, q_rope=q_rope, latent=latent, k_rope=k_rope)

        index_inputs = None
        if self.indexer is not None:
            ix, r = self.indexer, cfg.qk_rope_head_dim
            iq = ix.wq_b(q_resid).view(T, cfg.index_n_heads, cfg.index_head_dim)
            ik = ix.k_norm(ix.wk(x))  # [T, index_head_dim]
            iq = torch.cat([apply_rope_interleaved(iq[..., :r], cos, sin), iq[..., r:]], dim=-1)
            ik = torch.cat([apply_rope_interleaved(ik[:, None, :r], cos, sin)[:, 0], ik[:, r:]], dim=-1)
            w = ix.weights_proj(x.to(ix.weights_proj.weight.dtype)).float() * cfg.index_n_heads**-0.5
            index_inputs = IndexerInputs(q=iq, k=ik, weights=w)

        out, topk = backend.attend(
            self.layer, LayerWeights(kv_b_proj=self.kv_b_proj.weight), mla, index_inputs, prev_topk, ctx
        )
        return self.o_proj(out), topk


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = _linear(hidden, inter)
        self.up_proj = _linear(hidden, inter)
        self.down_proj = _linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: GlmMoeDsaConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, device="meta"))
        self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts, device="meta"))


class MoEBlock(nn.Module):
    """Router + routed experts (through the runner) + shared expert."""

    def __init__(self, cfg: GlmMoeDsaConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = Router(cfg)
        self.shared_experts = DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor, runner: MoERunner) -> torch.Tensor:
        topk_weights, topk_ids = route(x, self.gate.weight, self.gate.e_score_correction_bias, self.cfg)
        routed = runner.run(self.layer, x, topk_ids, topk_weights)
        return routed + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GlmMoeDsaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoEBlock(cfg, layer) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        runner: MoERunner,
        ctx: StepContext,
        prev_topk: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, topk = self.self_attn(self.input_layernorm(x), cos, sin, backend, ctx, prev_topk)
        x = x + attn
        h = self.post_attention_layernorm(x)
        mlp = self.mlp(h, runner) if isinstance(self.mlp, MoEBlock) else self.mlp(h)
        return x + mlp, topk


class SharedHead(nn.Module):
    def __init__(self, cfg: GlmMoeDsaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head: nn.Linear | None = None  # None: the main model's lm_head is shared


class MTPLayer(DecoderLayer):
    """NextN layer: eh_proj([enorm(embed(next_token)), hnorm(hidden)]) -> decoder layer -> shared head."""

    def __init__(self, cfg: GlmMoeDsaConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = _linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens: nn.Embedding | None = None  # None: the main model's is shared


class Model(nn.Module):
    def __init__(self, cfg: GlmMoeDsaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        layers += [MTPLayer(cfg, i) for i in cfg.mtp_layer_ids]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GlmMoeDsaForCausalLM(nn.Module):
    """`forward` runs the main stack over a packed step; `mtp_forward` runs one NextN layer."""

    def __init__(self, cfg: GlmMoeDsaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Model(cfg)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def _rope(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(ctx.positions, self.inv_freq, self.dtype)

    def forward(
        self, input_ids: torch.Tensor, ctx: StepContext, backend: AttentionBackend, runner: MoERunner
    ) -> torch.Tensor:
        """input_ids: [tokens] -> final hidden states [tokens, hidden_size] (after the final norm)."""
        cos, sin = self._rope(ctx)
        x = self.model.embed_tokens(input_ids)
        topk = None
        for layer in self.model.layers[: self.cfg.num_hidden_layers]:
            x, topk = layer(x, cos, sin, backend, runner, ctx, topk)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [tokens, hidden_size] -> [tokens, vocab_size]."""
        return self.lm_head(hidden)

    def mtp_forward(
        self,
        index: int,
        input_ids: torch.Tensor,
        prev_hidden: torch.Tensor,
        ctx: StepContext,
        backend: AttentionBackend,
        runner: MoERunner,
        logit_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft step `index` of the MTP stack.

        input_ids: [tokens] (the token after each position), prev_hidden: [tokens, hidden_size] (the
        target's final-normed hidden state at that position) -> (draft logits [rows, vocab] for
        `logit_rows` (default: every token; a drafter needs only each sequence's last row, which
        saves a vocabulary-sized matmul per prefill token), hidden [tokens, hidden_size] before the
        shared head's norm, fed to the next draft step).
        """
        mtp: MTPLayer = self.model.layers[self.cfg.num_hidden_layers + index]  # type: ignore[assignment]
        embed = mtp.embed_tokens if mtp.embed_tokens is not None else self.model.embed_tokens
        head = mtp.shared_head.head if mtp.shared_head.head is not None else self.lm_head
        cos, sin = self._rope(ctx)
        x = mtp.eh_proj(torch.cat([mtp.enorm(embed(input_ids)), mtp.hnorm(prev_hidden)], dim=-1))
        x, _ = DecoderLayer.forward(mtp, x, cos, sin, backend, runner, ctx, None)
        rows = x if logit_rows is None else x[logit_rows]
        return head(mtp.shared_head.norm(rows)), x
