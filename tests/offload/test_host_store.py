"""Host expert store: layout and padding, filling from a checkpoint, clear errors."""

from __future__ import annotations

import pytest
import torch

from moed.formats.fp8 import dequantize_block_fp8
from moed.model.config import GlmMoeDsaConfig
from moed.model.weights import Checkpoint, quantize_expert, read_expert
from moed.offload import host_store
from moed.offload.host_store import ExpertLayout, HostExpertStore, HostStoreError


def test_offload_store_fills_from_fp8_checkpoint_with_padding(tiny_fp8_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(tiny_fp8_checkpoint)
    layout = ExpertLayout.for_config(cfg)
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
        assert torch.equal(w13[:I], gate) and torch.equal(w13[N : N + I], up) and torch.equal(w2[:, :I], down)
        assert not w13[I:N].any() and not w13[N + I :].any() and not w2[:, I:].any()  # exact zeros in the padding
    # Slab layout: section s of expert e at section_offset[s] + e * section_bytes[s].
    slab = store.slabs[layers[0]]
    off, nb = layout.section_offsets["w2"], layout.section_bytes["w2"]
    assert torch.equal(
        slab[off + 3 * nb : off + 4 * nb], store.expert(layers[0], 3)["w2"].reshape(-1).view(torch.uint8)
    )
    assert layout.slab_bytes == slab.numel()


def test_offload_store_bf16_layout_and_errors(tiny_checkpoint):
    cfg = GlmMoeDsaConfig.from_file(tiny_checkpoint)
    layout = ExpertLayout.for_config(cfg)
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


def test_offload_store_int4_sections_from_pack_quantized_checkpoint(tiny_int4_checkpoint, tiny_checkpoint):
    """An int4 checkpoint fills the six sections with its own bytes: gate rows then up rows (packed values, bf16
    scales, zero points packed along rows), down; a bf16 checkpoint with expert_dtype int4 gets the same layout."""
    from moed.formats import int4

    cfg = GlmMoeDsaConfig.from_file(tiny_int4_checkpoint)
    layout = ExpertLayout.for_config(cfg)
    assert layout.is_int4 and layout.group == 128 and list(layout.shapes) == list(host_store.SECTIONS)
    assert layout == ExpertLayout.for_config(GlmMoeDsaConfig.from_file(tiny_checkpoint), "int4")
    I = layout.inter
    store = HostExpertStore(layout, [1, 3], pin=False)
    store.fill_from_checkpoint(tiny_int4_checkpoint, cfg)
    ckpt = Checkpoint(tiny_int4_checkpoint)
    w, _ = read_expert(ckpt, cfg, 3, 7)
    gate, up, down = w.int4()
    ex = store.expert(3, 7)
    assert torch.equal(ex["w13"], torch.cat([gate.qweight, up.qweight])) and torch.equal(ex["w2"], down.qweight)
    assert torch.equal(ex["w13_scale"], torch.cat([gate.scales, up.scales])) and ex["w2_scale"].dtype == torch.bfloat16
    assert torch.equal(ex["w13_zeros"][: I // 8], gate.zeros) and torch.equal(ex["w2_zeros"], down.zeros)
    full = int4.dequantize_int4(int4.Int4Weight(ex["w13"], ex["w13_scale"], ex["w13_zeros"], 128))
    assert torch.equal(full[I:], int4.dequantize_int4(up))
    offs, nb = layout.section_offsets, layout.section_bytes
    assert all(o % host_store.SECTION_ALIGN == 0 for o in offs.values())
    assert layout.slab_bytes == store.slabs[1].numel() == offs["w2_zeros"] + 16 * nb["w2_zeros"]
    with pytest.raises(HostStoreError, match="multiples of 8"):
        ExpertLayout(4, 128, 60, 60, torch.uint8, None, 128)
    # The same layout filled from the bf16 checkpoint, quantised as read: the load-time quantiser's bytes (which fits
    # each group's range, where the checkpoint writer keeps min/max), in the same sections.
    bf16_cfg = GlmMoeDsaConfig.from_file(tiny_checkpoint)
    quantised = HostExpertStore(layout, [1, 3], pin=False)
    quantised.fill_from_checkpoint(tiny_checkpoint, bf16_cfg)
    bf16_ckpt = Checkpoint(tiny_checkpoint)
    for layer in (1, 3):
        assert {n: t.shape for n, t in quantised.sections(layer).items()} == {
            n: t.shape for n, t in store.sections(layer).items()
        }
        for e in (0, 7):
            gate, up, down = quantize_expert(read_expert(bf16_ckpt, bf16_cfg, layer, e)[0], bf16_cfg, "cpu").int4()
            ex = quantised.expert(layer, e)
            assert torch.equal(ex["w13"], torch.cat([gate.qweight, up.qweight])) and torch.equal(ex["w2"], down.qweight)
            assert torch.equal(ex["w13_scale"], torch.cat([gate.scales, up.scales]))
            assert torch.equal(ex["w13_zeros"][: I // 8], gate.zeros) and torch.equal(ex["w2_zeros"], down.zeros)


def test_offload_store_pinning_failure_names_size_limit_and_setting(monkeypatch):
    def refuse(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(host_store.torch, "empty", refuse)
    layout = ExpertLayout(256, 6144, 2048, 2048, torch.float8_e4m3fn, (128, 128))
    with pytest.raises(HostStoreError) as err:
        HostExpertStore(layout, [3, 4], pin=True)
    msg = str(err.value)
    assert "9." in msg and "GiB" in msg and "RLIMIT_MEMLOCK" in msg and "FP8" in msg and "layers=" in msg


@pytest.mark.parametrize("alloc", ["mmap", "huge"])
def test_offload_store_mapped_slabs_are_exact_and_hold_experts(tiny_fp8_checkpoint, alloc):
    """mmap/huge slabs: exactly the slab's bytes (torch's pinned allocator rounds up to a power of two), huge ones
    2 MiB-aligned, and they store what the torch slabs store."""
    cfg = GlmMoeDsaConfig.from_file(tiny_fp8_checkpoint)
    layout = ExpertLayout.for_config(cfg)
    layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    ref = HostExpertStore(layout, layers, pin=False, alloc="torch")
    ref.fill_from_checkpoint(tiny_fp8_checkpoint, cfg)
    store = HostExpertStore(layout, layers, pin=False, alloc=alloc)
    store.fill_from_checkpoint(tiny_fp8_checkpoint, cfg)
    for layer in layers:
        assert store.slabs[layer].numel() == layout.slab_bytes
        for name, sec in store.section_bytes_of(layer).items():  # the sections (alignment gaps are not written)
            assert torch.equal(sec, ref.section_bytes_of(layer)[name])
        if alloc == "huge":
            assert store.slabs[layer].data_ptr() % host_store.HUGE_PAGE == 0
    assert store.reserved_bytes == layout.slab_bytes * len(layers)


def test_offload_store_reserved_bytes_count_torch_rounding():
    layout = ExpertLayout(256, 6144, 2048, 2048, torch.float8_e4m3fn, (128, 128))
    store = HostExpertStore.__new__(HostExpertStore)
    store.layout, store.layers, store.pinned, store.alloc = layout, [3, 4], True, "torch"
    assert layout.slab_bytes / 2**30 == pytest.approx(9.0, abs=0.05)  # one GLM-5.1 layer's experts...
    assert store.reserved_bytes == 2 * 16 * 2**30  # ...pin 16 GiB each through torch's allocator


def test_offload_store_host_alloc_setting_is_checked(monkeypatch):
    layout = ExpertLayout(4, 256, 128, 128, torch.float8_e4m3fn, (128, 128))
    monkeypatch.setenv("MOED_HOST_ALLOC", "hugepages")
    with pytest.raises(HostStoreError, match=r"MOED_HOST_ALLOC='hugepages'.*torch, mmap, huge"):
        HostExpertStore(layout, [1], pin=False)
    monkeypatch.setenv("MOED_HOST_ALLOC", "huge")
    assert HostExpertStore(layout, [1], pin=False).alloc == "huge"
    with pytest.raises(HostStoreError, match="host allocation 'big'"):
        HostExpertStore(layout, [1], pin=False, alloc="big")  # type: ignore[arg-type]
    status = host_store.thp_status()
    assert "enabled" in status
