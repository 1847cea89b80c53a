"""Host expert store: layout and padding, filling from a checkpoint, clear errors."""

from __future__ import annotations

import pytest
import torch

from moed.formats.fp8 import dequantize_block_fp8
from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import Checkpoint, read_expert
from moed.offload import host_store
from moed.offload.host_store import ExpertLayout, HostExpertStore, HostStoreError


def test_offload_store_fills_from_fp8_checkpoint_with_padding(tiny_fp8_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(tiny_fp8_checkpoint)
    layout = ExpertLayout.for_config(cfg, fp8=True)
    assert layout.inter_real == 64 and layout.inter == 128  # padded to the 128 block: gate/up never share a scale
    layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    store = HostExpertStore(layout, layers, pin=False)
    assert store.fill_from_checkpoint(tiny_fp8_checkpoint, cfg) > 0
    ckpt = Checkpoint(tiny_fp8_checkpoint)
    bn, bk = layout.block
    I, N = layout.inter_real, layout.inter
    for layer, e in ((layers[0], 0), (layers[-1], cfg.n_routed_experts - 1)):
        w, _ = read_expert(ckpt, cfg, layer, e)
        ex = store.expert(layer, e)
        w13 = dequantize_block_fp8(ex["w13"], ex["w13_scale"], bn, bk)
        w2 = dequantize_block_fp8(ex["w2"], ex["w2_scale"], bn, bk)
        gate, up, down = w.dequantized((bn, bk), torch.float32)
        assert torch.equal(w13[:I], gate) and torch.equal(w13[N:N + I], up) and torch.equal(w2[:, :I], down)
        assert not w13[I:N].any() and not w13[N + I:].any() and not w2[:, I:].any()  # exact zeros in the padding
    # Slab layout: section s of expert e at section_offset[s] + e * section_bytes[s].
    slab = store.slabs[layers[0]]
    off, nb = layout.section_offsets["w2"], layout.section_bytes["w2"]
    assert torch.equal(slab[off + 3 * nb: off + 4 * nb], store.expert(layers[0], 3)["w2"].reshape(-1).view(torch.uint8))
    assert layout.slab_bytes == slab.numel()


def test_offload_store_bf16_layout_and_errors(tiny_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(tiny_checkpoint)
    layout = ExpertLayout.for_config(cfg, fp8=False)
    assert layout.block is None and set(layout.shapes) == {"w13", "w2"}
    store = HostExpertStore(layout, [1], pin=False)
    ckpt = Checkpoint(tiny_checkpoint)
    w, _ = read_expert(ckpt, cfg, 1, 0)
    store.load_expert(1, 0, w)
    with pytest.raises(HostStoreError, match=r"experts \[1, 2"):
        store.finish_loading()
    with pytest.raises(HostStoreError, match="not offloaded"):
        store.load_expert(2, 0, w)
    with pytest.raises(HostStoreError, match="out of range"):
        store.load_expert(1, cfg.n_routed_experts, w)
    bad = type(w)(gate_proj=w.gate_proj[:, :5], up_proj=w.up_proj, down_proj=w.down_proj)
    with pytest.raises(HostStoreError, match="gate_proj has shape"):
        store.load_expert(1, 1, bad)
    with pytest.raises(HostStoreError, match="quantization_config"):
        ExpertLayout.for_config(cfg, fp8=True)


def test_offload_store_pinning_failure_names_size_limit_and_setting(monkeypatch):
    def refuse(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(host_store.torch, "empty", refuse)
    layout = ExpertLayout(256, 6144, 2048, 2048, torch.float8_e4m3fn, (128, 128))
    with pytest.raises(HostStoreError) as err:
        HostExpertStore(layout, [3, 4], pin=True)
    msg = str(err.value)
    assert "9." in msg and "GiB" in msg and "RLIMIT_MEMLOCK" in msg and "FP8" in msg and "layers=" in msg
