"""The Triton DSA backend through the whole model vs the reference backend, the dense threshold, the KV pool
layouts and the backend selection table (CPU: kernels in the Triton interpreter, fp32 pools, exact)."""

from __future__ import annotations

import logging

import pytest
import torch

from moed.attention.dense import DENSE_THRESHOLD_ENV, resolve_dense_threshold
from moed.attention.nsa import TritonSparseAttention
from moed.attention.paged_kv import PagedKVPool, PagedSequence, PoolExhausted, fp8_row_bytes
from moed.attention.reference import ReferenceAttention
from moed.attention.select import BackendUnavailable, Platform, choose_backend, make_attention_backend
from moed.model.attention_interface import SequenceStep, StepContext
from moed.model.checkpoint import make_checkpoint, make_config
from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import load_model
from moed.offload.torch_runner import TorchMoERunner

TOL = 1e-4
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled kernels where there is a GPU


def _load(path: str):
    cfg = GlmMoeDsaConfig.from_file(f"{path}/config.json")
    runner = TorchMoERunner(cfg, torch.float32, DEV)
    return cfg, load_model(path, runner, dtype=torch.float32, device=DEV, config=cfg), runner


def _run_steps(model, runner, backend, ids: list[torch.Tensor], steps: list[list[tuple[int, int, int]]]):
    """steps: per step, (sequence, start, end) chunks -> logits per step."""
    kvs = [backend.new_sequence() for _ in ids]
    outs = []
    for chunks in steps:
        tokens = torch.cat([ids[s][a:b] for s, a, b in chunks]).to(DEV)
        ctx = StepContext(
            positions=torch.cat([torch.arange(a, b) for _, a, b in chunks]).to(DEV),
            seqs=[SequenceStep(a, b - a, kvs[s]) for s, a, b in chunks],
        )
        with torch.no_grad():
            outs.append(model.logits(model(tokens, ctx, backend, runner)))
    return outs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Sequences of 5, 40 and 17 tokens (top-k is 16): prefill chunks, decode steps and a mixed step; dense steps
# (every context <= 16) and sparse ones.
STEPS = [
    [(0, 0, 5), (2, 0, 10)],  # dense prefill (MHA path)
    [(0, 5, 6), (2, 10, 11)],  # dense decode (absorbed, all positions)
    [(1, 0, 30), (2, 11, 14)],  # sparse prefill, mixing contexts below and above top-k
    [(0, 6, 7), (1, 30, 31), (2, 14, 15)],  # sparse decode, mixed
    [(1, 31, 40), (2, 15, 17)],
]


@pytest.mark.parametrize("pattern", [None, "FSFS"])
def test_attention_triton_backend_matches_reference_through_the_model(tmp_path, pattern, tiny_checkpoint):
    path = (
        tiny_checkpoint
        if pattern is None
        else str(
            make_checkpoint(tmp_path / "shared", "tiny", device="cpu", config_overrides={"index_topk_pattern": pattern})
        )
    )
    cfg, model, runner = _load(path)
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (7, 40, 17)]
    ref = _run_steps(model, runner, ReferenceAttention(cfg), ids, STEPS)
    tri = TritonSparseAttention(cfg, PagedKVPool(cfg, 64, 8, "fp32", "fp32", DEV))
    got = _run_steps(model, runner, tri, ids, STEPS)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert _rel(a, b) <= TOL, i


def test_attention_dense_threshold_zero_is_still_exact(tiny_checkpoint):
    """Forcing the sparse path for short contexts (threshold 0) selects every position: same logits."""
    cfg, model, runner = _load(tiny_checkpoint)
    ids = [torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2))]
    steps = [[(0, 0, 9)], [(0, 9, 10)]]
    ref = _run_steps(model, runner, ReferenceAttention(cfg), ids, steps)
    tri = TritonSparseAttention(cfg, PagedKVPool(cfg, 16, 4, "fp32", "fp32", DEV), dense_threshold=0)
    for a, b in zip(_run_steps(model, runner, tri, ids, steps), ref):
        assert _rel(a, b) <= TOL


def test_attention_dense_threshold_sources(monkeypatch, caplog):
    cfg = GlmMoeDsaConfig.from_dict(make_config("tiny"))
    monkeypatch.delenv(DENSE_THRESHOLD_ENV, raising=False)
    assert resolve_dense_threshold(cfg) == cfg.index_topk
    monkeypatch.setenv(DENSE_THRESHOLD_ENV, "8")
    assert resolve_dense_threshold(cfg) == 8
    assert resolve_dense_threshold(cfg, 4) == 4  # config wins over env
    monkeypatch.setenv(DENSE_THRESHOLD_ENV, "lots")
    with pytest.raises(ValueError, match="not an integer"):
        resolve_dense_threshold(cfg)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_dense_threshold(cfg, -1)
    with caplog.at_level(logging.WARNING):
        assert resolve_dense_threshold(cfg, 64) == 64
    assert "above index_topk" in caplog.text


def test_attention_pool_layouts_and_pages():
    glm = GlmMoeDsaConfig.from_dict(make_config("glm51-slice"))
    assert PagedKVPool.bytes_per_token(glm, "bf16", "fp8") == (1152, 132)
    assert PagedKVPool.bytes_per_token(glm, "fp8", "fp8") == (656, 132) and fp8_row_bytes(512, 64) == 656
    cfg = GlmMoeDsaConfig.from_dict(make_config("tiny"))
    pool = PagedKVPool(cfg, 5, 4, "fp8", "fp8")
    C, R, D = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
    assert pool.latent.shape == (cfg.num_hidden_layers + cfg.num_nextn_predict_layers, 5, 4, fp8_row_bytes(C, R))
    assert pool.index_k.shape[-1] == 4 * (D + 4)
    seq = PagedSequence(pool)
    seq.reserve(9)
    assert len(seq.pages) == 3 and 0 not in seq.pages  # page 0 is reserved
    with pytest.raises(PoolExhausted, match="2 pages requested, 1 of 4 free"):
        PagedSequence(pool).reserve(8)
    seq.truncate(4)
    assert len(seq.pages) == 1 and pool.free_pages == 3
    # Byte positions of one token's parts in the FP8 latent row and index-K page.
    lv, iv = pool.latent_view(1), pool.index_view(1)
    lv.scale[2, 3] = 2.0
    iv.scale[2, 1] = 3.0
    row = pool.latent[pool.layer_slot[1], 2, 3]
    assert row[C + 2 * R : C + 2 * R + 4].view(torch.float32).item() == 2.0
    page = pool.index_k[pool.index_slot[1], 2]
    assert page[4 * D + 4 : 4 * D + 8].view(torch.float32).item() == 3.0
    with pytest.raises(ValueError, match="not supported"):
        PagedKVPool(cfg, 5, 4, "int4", "fp8")
    with pytest.raises(ValueError, match="power of two"):
        PagedKVPool(cfg, 5, 6)


H100 = Platform("cuda", (9, 0), "NVIDIA H100 80GB HBM3", has_flashinfer=False, interpret=False)
B200 = Platform("cuda", (10, 0), "NVIDIA B200", has_flashinfer=True, interpret=False)
CPU = Platform("cpu", None, "cpu", has_flashinfer=False, interpret=False)


@pytest.mark.parametrize(
    "platform,requested,page,latent,expected",
    [
        (CPU, "auto", 64, "bf16", "reference"),
        (CPU, "reference", 64, "bf16", "reference"),
        (Platform("cpu", None, "cpu", False, True), "triton", 64, "bf16", "triton"),
        (H100, "auto", 64, "bf16", "triton"),
        (H100, "triton", 64, "fp8", "triton"),
        (Platform("cuda", (7, 5), "T4", False, False), "auto", 64, "bf16", "reference"),
        (B200, "auto", 64, "bf16", "trtllm"),
        (B200, "auto", 64, "fp8", "triton"),  # the per-token-scale FP8 layout is the Triton backend's
        (B200, "auto", 16, "bf16", "triton"),  # trtllm-gen pages are 32 or 64
        (Platform("cuda", (10, 0), "NVIDIA B200", False, False), "auto", 64, "bf16", "triton"),
        (B200, "triton", 64, "bf16", "triton"),
        (B200, "trtllm", 32, "bf16", "trtllm"),
    ],
)
def test_attention_selection_table(platform, requested, page, latent, expected):
    cfg = GlmMoeDsaConfig.from_dict(make_config("glm51-slice"))
    assert choose_backend(requested, platform, cfg, page, latent).name == expected


@pytest.mark.parametrize(
    "platform,requested,page,message",
    [
        (H100, "trtllm", 64, "need SM100"),
        (CPU, "triton", 64, "need a CUDA device"),
        (CPU, "trtllm", 64, "need an SM100"),
        (Platform("cuda", (10, 0), "NVIDIA B200", False, False), "trtllm", 64, "flashinfer is not installed"),
        (B200, "trtllm", 16, "page size"),
        (Platform("cuda", (7, 5), "T4", False, False), "triton", 64, "SM80"),
    ],
)
def test_attention_explicit_choice_that_cannot_run_is_an_error(platform, requested, page, message):
    cfg = GlmMoeDsaConfig.from_dict(make_config("glm51-slice"))
    with pytest.raises(BackendUnavailable, match=message):
        choose_backend(requested, platform, cfg, page, "bf16")


def test_attention_selection_model_dims_and_logging(caplog):
    tiny = GlmMoeDsaConfig.from_dict(make_config("tiny"))
    with pytest.raises(BackendUnavailable, match="kv_lora_rank 512"):
        choose_backend("trtllm", B200, tiny, 64, "bf16")
    with pytest.raises(ValueError, match="unknown"):
        choose_backend("flash", H100, tiny)
    with caplog.at_level(logging.INFO, logger="moed.attention.select"):
        backend = make_attention_backend(tiny, "cpu", "auto", platform=CPU)
    assert isinstance(backend, ReferenceAttention) and "attention backend: reference" in caplog.text
    backend = make_attention_backend(
        tiny, "cpu", "triton", num_pages=8, page_size=4, platform=Platform("cpu", None, "cpu", False, True)
    )
    assert isinstance(backend, TritonSparseAttention) and backend.pool.page_size == 4
