"""moed.formats.int4: quantisation error bounds, the byte layout against its written spec, compressed-tensors parity."""

from __future__ import annotations

import pytest
import torch

from moed.formats import int4


def _spec_words(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 [rows, 8 n] in [-8, 7] as the layout's spec says, with Python ints: value 8j + k of a row in bits
    4k..4k+3 of word j, offset +8, read as a two's-complement int32."""
    rows, cols = values.shape
    out = torch.empty((rows, cols // 8), dtype=torch.int32)
    for r in range(rows):
        for j in range(cols // 8):
            word = sum((int(values[r, 8 * j + k]) + 8) << (4 * k) for k in range(8))
            out[r, j] = word - (1 << 32) if word >= 1 << 31 else word
    return out


@pytest.mark.parametrize("shape,group", [((24, 256), 128), ((16, 192), 128), ((8, 64), 128), ((40, 96), 32)])
def test_int4_round_trip_error_is_within_one_step(shape, group):
    gen = torch.Generator().manual_seed(shape[0] * shape[1] + group)
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 0, shape[1])  # groups of very different ranges
    q = int4.quantize_int4(w, group)
    assert q.qweight.shape == (shape[0], shape[1] // 2) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == (shape[0], -(-shape[1] // group)) and q.scales.dtype == torch.bfloat16
    assert q.zeros.shape == (-(-shape[0] // 8), -(-shape[1] // group)) and q.zeros.dtype == torch.int32
    d = int4.dequantize_int4(q)
    step = q.scales.float().repeat_interleave(group, dim=1)[:, : shape[1]]
    err = (d - w).abs()
    # Interior values round to the nearest level (half a step); the zero point's rounding can clip the
    # group's extreme by up to one step more.
    assert (err <= step * 1.01 + 1e-12).all()
    assert float(err.pow(2).mean().sqrt() / step.pow(2).mean().sqrt()) < 0.4  # ~ 1/sqrt(12) for uniform rounding
    zero_in = torch.zeros((1, shape[1]))
    assert torch.equal(int4.dequantize_int4(int4.quantize_int4(zero_in, group)), zero_in)  # zeros stay exact


def test_int4_layout_matches_the_written_spec():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn((12, 256), generator=gen)
    q = int4.quantize_int4(w)
    vals = int4.unpack_int4(q.qweight)
    assert vals.min() >= -8 and vals.max() <= 7
    packed = int4.to_pack_quantized(q)
    assert torch.equal(packed["weight_packed"], _spec_words(vals))
    # Zero points: packed along the output rows, 8 rows a word (padding rows 12..15 hold 0).
    z = int4.unpack_zeros(q.zeros, 12)
    padded = torch.cat([z, torch.full((4, z.shape[1]), -8, dtype=torch.int8)])
    assert torch.equal(packed["weight_zero_point"], _spec_words(padded.T.contiguous()).T)
    assert packed["weight_shape"].tolist() == [12, 256]
    # Byte view: element 2b of a row is the low nibble of byte b, element 2b + 1 the high one.
    assert torch.equal((q.qweight & 0xF).to(torch.int8) - 8, vals[:, 0::2])
    assert torch.equal((q.qweight >> 4).to(torch.int8) - 8, vals[:, 1::2])


def test_int4_from_pack_quantized_reinterprets_without_copy_and_names_bad_tensors():
    q = int4.quantize_int4(torch.randn((16, 128), generator=torch.Generator().manual_seed(2)))
    t = int4.to_pack_quantized(q)
    back = int4.from_pack_quantized(
        t["weight_packed"], t["weight_scale"], t["weight_shape"], t["weight_zero_point"], 128
    )
    assert back.qweight.data_ptr() == t["weight_packed"].data_ptr()
    assert torch.equal(int4.dequantize_int4(back), int4.dequantize_int4(q))
    sym = int4.from_pack_quantized(t["weight_packed"], t["weight_scale"], t["weight_shape"], None, 128)
    assert torch.equal(
        int4.dequantize_int4(sym), int4.unpack_int4(q.qweight).float() * q.scales.float().repeat_interleave(128, dim=1)
    )
    with pytest.raises(ValueError, match="weight_packed"):
        int4.from_pack_quantized(t["weight_packed"][:, :8], t["weight_scale"], t["weight_shape"], None, 128)
    with pytest.raises(ValueError, match="weight_scale"):
        int4.from_pack_quantized(t["weight_packed"], t["weight_scale"], t["weight_shape"], None, 32)
    with pytest.raises(ValueError, match="weight_zero_point"):
        int4.from_pack_quantized(
            t["weight_packed"], t["weight_scale"], t["weight_shape"], t["weight_zero_point"].T, 128
        )
    with pytest.raises(ValueError, match="multiple of 8"):
        int4.quantize_int4(torch.zeros((4, 12)))


def test_int4_matches_compressed_tensors_packing():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = int4.quantize_int4(torch.randn((24, 384), generator=torch.Generator().manual_seed(3)))
    t = int4.to_pack_quantized(q)
    assert torch.equal(ct.pack_to_int32(int4.unpack_int4(q.qweight), 4), t["weight_packed"])
    assert torch.equal(ct.pack_to_int32(int4.unpack_zeros(q.zeros, 24), 4, packed_dim=0), t["weight_zero_point"])
    assert torch.equal(ct.unpack_from_int32(t["weight_packed"], 4, torch.Size([24, 384])), int4.unpack_int4(q.qweight))


def test_int4_bytes_of_a_glm51_expert():
    per_expert = 2 * int4.nbytes(2048, 6144) + int4.nbytes(6144, 2048)
    assert per_expert == 3 * 2048 * 6144 // 2 + 3 * 2 * 2048 * 48 + 2 * 4 * 256 * 48 + 4 * 768 * 16
    assert 256 * 75 * per_expert < 400e9  # the issue's host-memory target for GLM-5.1's routed experts


@pytest.mark.parametrize("shape,group", [((32, 512), 128), ((16, 200), 64)])
def test_int4_clip_search_fits_every_group_at_least_as_well_as_min_max(shape, group):
    gen = torch.Generator().manual_seed(7)
    # heavy tails: a group's extreme is far from the rest, where shrinking the range pays
    w = torch.randn(shape, generator=gen) / torch.sqrt((torch.randn((3, *shape), generator=gen) ** 2).mean(0))
    plain, fitted = int4.quantize_int4(w, group), int4.quantize_int4(w, group, clip_search=True)
    G = -(-shape[1] // group)

    def group_err(q):
        e = (int4.dequantize_int4(q) - w).square()
        e = torch.cat([e, e.new_zeros(shape[0], G * group - shape[1])], dim=1)  # the partial group: its own values
        return e.view(shape[0], G, group).sum(-1)

    assert (group_err(fitted) <= group_err(plain) * (1 + 1e-6) + 1e-12).all()
    assert float(group_err(fitted).sum()) < 0.97 * float(group_err(plain).sum())  # and clearly better overall
    assert fitted.qweight.shape == plain.qweight.shape and fitted.scales.dtype == torch.bfloat16
    assert (fitted.scales.float() <= plain.scales.float() * (1 + 1e-2)).all()  # ranges only shrink
    # a group min/max already fits exactly (its values on the grid) keeps min/max: factor 1 wins ties
    grid = (torch.arange(16.0) - 8).repeat(2, 8) * 0.5
    exact = int4.quantize_int4(grid, clip_search=True)
    assert torch.equal(int4.dequantize_int4(exact), grid)
    zero_in = torch.zeros((1, shape[1]))
    assert torch.equal(int4.dequantize_int4(int4.quantize_int4(zero_in, group, clip_search=True)), zero_in)
