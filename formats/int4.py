"""Int4 weights, group-wise along K (the input dimension): moed's 4-bit expert format (plain torch).

Byte layout of one quantised linear weight `w: [out, in]` (`in` a multiple of 8; `group` 128 unless stated,
`G = ceil(in / group)`, the last group partial when `group` does not divide `in`):
- `qweight: uint8 [out, in / 2]`: element (o, i) in byte (o, i // 2), low nibble for even i, high for odd i,
  stored unsigned as `u = q + 8` for the signed value q in [-8, 7].
- `scales: [out, G]` floating point (bf16 when moed quantises; community checkpoints store their model dtype).
- `zeros: int32 [ceil(out / 8), G]` or None: the zero point of row o and group g is nibble `o % 8` (bits
  4 (o % 8) .. +3) of word (o // 8, g), stored as `z + 8` for the signed z in [-8, 7]. None means symmetric (z = 0).
The real value of (o, i) is `(q - z) * scales[o, i // group]` (= `(u - (z + 8)) * scale`), computed in fp32.
A GLM-5.1 expert (three 2048 x 6144 matrices) is 18.87 MB of qweight + 0.59 MB of bf16 scales + 0.15 MB of
zero points = 19.6 MB (FP8 with block scales: 37.8 MB); 256 experts x 75 layers = 376 GB.

This is, byte for byte, compressed-tensors' `pack-quantized` layout for 4-bit group quantisation, the layout vLLM
and sglang load for W4A16 / W4A16_ASYM AWQ and GPTQ releases: there a weight is `weight_packed: int32 [out, in / 8]`
(value 8j + k of a row in bits 4k..4k+3 of word j, offset +8), `weight_scale [out, G]`, `weight_zero_point: int32
[ceil(out / 8), G]` when asymmetric (packed along the output dimension, offset +8) and `weight_shape: int [2]`.
On a little-endian host the int32 words' bytes are `qweight`: `from_pack_quantized` reinterprets (no copy) and
`to_pack_quantized` is its inverse.

Quantiser (`quantize_int4`): asymmetric min/max per group, compressed-tensors' rule so a checkpoint moed writes
and one llm-compressor writes agree: lo = min(group, 0), hi = max(group, 0), scale = (hi - lo) / 15 rounded to
bf16, z = round(-8 - lo / scale) clamped to [-8, 7], q = clamp(round(x / scale) + z, -8, 7). Measured against
symmetric rules on GLM-width weights by `ops/bench/int4_error.py` (docs/benchmarks.md): equal on Gaussian weights,
18-26% lower weight error on heavy-tailed and outlier-channel weights, for 0.03 bits per weight more. Quantising a
checkpoint's experts at load (`--expert-dtype int4`) adds a clip search (`clip_search`): the same rule on [lo, hi]
shrunk by the factor that fits each group best: 4-6% less weight error (6-7% less expert output error) on
GLM-width weights, the same bytes and layout.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

GROUP_SIZE = 128
# The clip search's candidate shrink factors of a group's min/max range, 1 first (ties keep plain min/max): 16 steps
# down to 0.70 hold all the search gains on GLM-width weights (ops/bench/int4_error.py; a finer or wider grid, or a
# least-squares refit of the scale after it, moved the weight error by < 0.1%).
CLIP_FACTORS = tuple(float(f) for f in torch.linspace(1.0, 0.70, 16))
INT4_MIN, INT4_MAX = -8, 7
OFFSET = 8  # stored nibble = signed value + OFFSET


class Int4Weight(NamedTuple):
    qweight: torch.Tensor  # uint8 [out, in / 2]
    scales: torch.Tensor  # float [out, G]
    zeros: torch.Tensor | None  # int32 [ceil(out / 8), G], or None (symmetric)
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[-2], 2 * self.qweight.shape[-1])

    def with_zero_points(self) -> Int4Weight:
        """This weight with its zero points spelled out (symmetric: z = 0 in every group), so a store or pool of
        int4 weights has the same sections whichever way each was quantised. Only for one [out, in / 2] weight."""
        if self.zeros is not None:
            return self
        z = torch.zeros(self.scales.shape, dtype=torch.int8, device=self.scales.device)
        return self._replace(zeros=pack_zeros(z))

    def slot(self, i: int) -> Int4Weight:
        """Entry i of a weight stacked over slots ([S, out, in / 2] and friends)."""
        return Int4Weight(self.qweight[i], self.scales[i], None if self.zeros is None else self.zeros[i], self.group)


def num_groups(in_features: int, group: int = GROUP_SIZE) -> int:
    return -(-in_features // group)


def nbytes(out_features: int, in_features: int, group: int = GROUP_SIZE, symmetric: bool = False) -> int:
    """Bytes of one quantised [out, in] weight: packed values, bf16 scales, packed zero points."""
    g = num_groups(in_features, group)
    zeros = 0 if symmetric else 4 * -(-out_features // 8) * g
    return out_features * in_features // 2 + 2 * out_features * g + zeros


def _check_in_features(in_features: int, where: str) -> None:
    if in_features % 8:
        raise ValueError(f"{where}: in_features {in_features} must be a multiple of 8 (eight 4-bit values a word)")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: int8 [..., in] with values in [-8, 7] -> uint8 [..., in / 2] (even index in the low nibble)."""
    u = (q + OFFSET).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in / 2] -> int8 [..., in] with values in [-8, 7]."""
    if qweight.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: qweight must be uint8, got {qweight.dtype}")
    lo = (qweight & 0xF).to(torch.int8) - OFFSET
    hi = (qweight >> 4).to(torch.int8) - OFFSET
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_zeros(z: torch.Tensor) -> torch.Tensor:
    """z: int8 [out, G] in [-8, 7] -> int32 [ceil(out / 8), G] (row o in nibble o % 8 of word o // 8)."""
    out_f, g = z.shape
    u = torch.zeros((-(-out_f // 8) * 8, g), dtype=torch.int64, device=z.device)
    u[:out_f] = z.to(torch.int64) + OFFSET  # padding rows hold 0: never read
    shifts = (4 * torch.arange(8, device=z.device, dtype=torch.int64))[None, :, None]
    words = (u.view(-1, 8, g) << shifts).sum(dim=1)
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)  # as two's-complement int32


def unpack_zeros(zeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 [ceil(out / 8), G] -> int8 [out, G] in [-8, 7]."""
    if zeros.dtype != torch.int32:
        raise ValueError(f"unpack_zeros: zeros must be int32, got {zeros.dtype}")
    shifts = (4 * torch.arange(8, device=zeros.device, dtype=torch.int32))[None, :, None]
    u = (zeros[:, None, :] >> shifts) & 0xF  # arithmetic shift, then the mask keeps the nibble
    return (u.reshape(-1, zeros.shape[1])[:out_features] - OFFSET).to(torch.int8)


def _quantize_groups(
    blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's rule on groups [out, G, group] given each group's range [lo, hi] (lo <= 0 <= hi): (q fp32 in
    [-8, 7], scale bf16 [out, G], z fp32 [out, G])."""
    scale = ((hi - lo) / (INT4_MAX - INT4_MIN)).to(torch.bfloat16)
    inv = 1.0 / scale.float().masked_fill(scale == 0, 1.0)  # an all-zero group quantises to z
    z = torch.round(INT4_MIN - lo * inv).clamp(INT4_MIN, INT4_MAX)
    q = torch.round(blocks * inv[..., None]).add_(z[..., None]).clamp_(INT4_MIN, INT4_MAX)
    return q, scale, z


def quantize_int4(w: torch.Tensor, group: int = GROUP_SIZE, clip_search: bool = False) -> Int4Weight:
    """w: [out, in] float -> Int4Weight (asymmetric; see the module docstring), on w's device. With `clip_search`
    each group's range is the min/max one shrunk by whichever of CLIP_FACTORS quantises the group with the least
    squared error (factor 1, plain min/max, kept on ties)."""
    out_f, in_f = w.shape
    _check_in_features(in_f, "quantize_int4")
    g = num_groups(in_f, group)
    wf = w.float()
    if in_f % group:  # pad the partial group by repeating its last value: min and max stay the group's own
        wf = torch.cat([wf, wf[:, -1:].expand(out_f, g * group - in_f)], dim=1)
    blocks = wf.view(out_f, g, group)
    lo = blocks.amin(-1).clamp(max=0.0)
    hi = blocks.amax(-1).clamp(min=0.0)
    if clip_search:
        real = (torch.arange(g * group, device=w.device) < in_f).view(g, group)  # the padding is not the weight's
        best_f, best_err = None, None
        for f in CLIP_FACTORS:
            q, scale, z = _quantize_groups(blocks, lo * f, hi * f)
            err = (((q - z[..., None]) * scale.float()[..., None] - blocks).square_() * real).sum(-1)
            if best_err is None:
                best_f, best_err = torch.full_like(err, f), err
            else:
                better = err < best_err
                best_f = torch.where(better, f, best_f)
                best_err = torch.where(better, err, best_err)
        lo, hi = lo * best_f, hi * best_f
    q, scale, z = _quantize_groups(blocks, lo, hi)
    q = q.to(torch.int8).view(out_f, g * group)[:, :in_f]
    return Int4Weight(pack_int4(q), scale.contiguous(), pack_zeros(z.to(torch.int8)), group)


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Int4Weight -> [out, in] `dtype`, computed in fp32."""
    qweight, scales, zeros, group = weight
    q = unpack_int4(qweight)
    out_f, in_f = q.shape
    g = num_groups(in_f, group)
    if tuple(scales.shape) != (out_f, g):
        raise ValueError(
            f"dequantize_int4: scales {list(scales.shape)} do not fit qweight {list(qweight.shape)} "
            f"(want [{out_f}, {g}] for group {group})"
        )
    vals = q.float()
    if zeros is not None:
        if tuple(zeros.shape) != (-(-out_f // 8), g):
            raise ValueError(
                f"dequantize_int4: zeros {list(zeros.shape)} do not fit qweight {list(qweight.shape)} "
                f"(want [{-(-out_f // 8)}, {g}])"
            )
        vals = vals - unpack_zeros(zeros, out_f).float().repeat_interleave(group, dim=1)[:, :in_f]
    return (vals * scales.float().repeat_interleave(group, dim=1)[:, :in_f]).to(dtype)


def _little_endian(where: str) -> None:
    if sys.byteorder != "little":
        raise RuntimeError(f"{where}: int4 words are reinterpreted as bytes, which needs a little-endian host")


def from_pack_quantized(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shape,
    weight_zero_point: torch.Tensor | None,
    group: int,
) -> Int4Weight:
    """compressed-tensors pack-quantized (4-bit, group) tensors -> Int4Weight, reinterpreting the packed words.

    Raises ValueError naming the first tensor whose dtype or shape disagrees with `weight_shape` and `group`."""
    out_f, in_f = (int(v) for v in weight_shape)
    _check_in_features(in_f, "pack-quantized weight_shape")
    g = num_groups(in_f, group)
    if weight_packed.dtype != torch.int32 or tuple(weight_packed.shape) != (out_f, in_f // 8):
        raise ValueError(
            f"weight_packed must be int32 [{out_f}, {in_f // 8}] for weight_shape [{out_f}, {in_f}], "
            f"got {weight_packed.dtype} {list(weight_packed.shape)}"
        )
    if not weight_scale.is_floating_point() or tuple(weight_scale.shape) != (out_f, g):
        raise ValueError(
            f"weight_scale must be float [{out_f}, {g}] (group {group}), got {weight_scale.dtype} "
            f"{list(weight_scale.shape)}"
        )
    if weight_zero_point is not None and (
        weight_zero_point.dtype != torch.int32 or tuple(weight_zero_point.shape) != (-(-out_f // 8), g)
    ):
        raise ValueError(
            f"weight_zero_point must be int32 [{-(-out_f // 8)}, {g}] (packed along the output "
            f"dimension), got {weight_zero_point.dtype} {list(weight_zero_point.shape)}"
        )
    _little_endian("from_pack_quantized")
    return Int4Weight(weight_packed.contiguous().view(torch.uint8), weight_scale, weight_zero_point, group)


def to_pack_quantized(weight: Int4Weight) -> dict[str, torch.Tensor]:
    """Int4Weight -> the tensors compressed-tensors stores for one weight, keyed by their name suffixes."""
    _little_endian("to_pack_quantized")
    out_f, in_f = weight.shape
    tensors = {
        "weight_packed": weight.qweight.contiguous().view(torch.int32),
        "weight_scale": weight.scales,
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if weight.zeros is not None:
        tensors["weight_zero_point"] = weight.zeros
    return tensors
