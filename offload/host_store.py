"""The host expert store: every offloaded MoE layer's routed experts in one pinned host slab per layer.

An expert is stored in the layout the fused-MoE kernel reads from a GPU slot, so a miss is a plain
byte copy (by SM loads through UVA, or by the copy engine) with no repacking. Per format
(`ExpertLayout.format`, from `GlmMoeDsaConfig.expert_format`):

  bf16 / FP8 block (GLM-5.1-FP8):
    w13:       [2 * N, K]  gate rows 0..N-1, then up rows N..2N-1   (fp8 e4m3 or bf16)
    w2:        [K, N]                                               (same dtype)
    w13_scale: [2N / block_n, ceil(K / block_k)] fp32               (FP8 only)
    w2_scale:  [ceil(K / block_n), N / block_k] fp32                (FP8 only)
  int4 (`moed.formats.int4`: group-wise along K, compressed-tensors pack-quantized bytes; G13 = ceil(K / group),
  G2 = ceil(N / group)):
    w13:       [2N, K / 2] uint8   two weights a byte, even k in the low nibble; gate rows, then up rows
    w2:        [K, N / 2] uint8
    w13_scale: [2N, G13] bf16      w2_scale: [K, G2] bf16
    w13_zeros: [2N / 8, G13] int32 w2_zeros: [K / 8, G2] int32   (zero point + 8 of row o in nibble o % 8)
  Symmetric int4 experts are held with their zero points spelled out (z = 0), so every int4 store has the same six
  sections and one kernel path; a community checkpoint's fp16 / fp32 scales are rounded to bf16 (a relative
  change <= 2^-9, against a 4-bit step of ~1/15 of the group's range).

K = hidden_size; N = moe_intermediate_size rounded up to a multiple of lcm(block_n, block_k) for
FP8 (so gate and up never share a scale block); padded rows/columns hold zero weights and scale
1.0, which adds exact zeros to every sum. bf16 and int4 layers are not padded (int4 needs N and K to be
multiples of 8, which its own packing already requires).

One layer's slab is one pinned uint8 buffer of four (int4: six) sections, each holding all E experts back to
back (section starts aligned to 4 KiB):

    [w13 x E][w2 x E][w13_scale x E][w2_scale x E]([w13_zeros x E][w2_zeros x E])

so expert e's part of section s starts at `section_offset[s] + e * section_bytes[s]`. Slabs are
filled one expert at a time (`load_expert`, as `model.weights.load_model` hands experts over) or
shard by shard from a checkpoint (`fill_from_checkpoint`), never staging a layer anywhere else.

How slabs are allocated (`HostAlloc`, default `$MOED_HOST_ALLOC` or "torch"):
  torch  torch's pinned allocator (cudaHostAlloc). It rounds every request up to a power of two, so a
         GLM-5.1 layer (9.03 GiB) pins 16 GiB and an 8-expert layer (0.28 GiB) 0.5 GiB;
  mmap   an anonymous mapping of the exact size, touched by torch's threads, then cudaHostRegister: no
         rounding, 4 KiB pages;
  huge   the same mapping with madvise(MADV_HUGEPAGE), 2 MiB-aligned: transparent huge pages where the
         kernel allows them (`thp_status()`), so a 40 GB store needs ~20 k page-table entries, not ~10 M.
Off CUDA (pin=False) mmap and huge give the same mapping unpinned; torch gives plain pageable memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal, get_args

import torch

from moed.formats import int4
from moed.model.config import ExpertDtype, ExpertFormat, GlmMoeDsaConfig
from moed.model.moe import ExpertWeights
from moed.model.weights import Checkpoint, expert_names, quantize_expert, read_expert, stored_names

log = logging.getLogger(__name__)

SECTION_ALIGN = 4096
SECTIONS = ("w13", "w2", "w13_scale", "w2_scale", "w13_zeros", "w2_zeros")  # in slab order; bf16 has the first two
HostAlloc = Literal["torch", "mmap", "huge"]
HOST_ALLOCS: tuple[str, ...] = get_args(HostAlloc)
HUGE_PAGE = 2 << 20
REGISTER_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class HostStoreError(RuntimeError):
    """The host store cannot be built or filled; the message names the size, layer or expert."""


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Shapes and byte layout of one layer's experts (identical for every layer of a model)."""

    num_experts: int
    hidden: int  # K
    inter: int  # N as stored (padded for FP8)
    inter_real: int  # moe_intermediate_size
    dtype: torch.dtype  # torch.float8_e4m3fn, torch.bfloat16, or torch.uint8 (int4, two weights a byte)
    block: tuple[int, int] | None  # (block_n, block_k) when FP8
    group: int | None = None  # int4: inputs per scale and zero point

    def __post_init__(self) -> None:
        if (self.dtype == torch.uint8) != (self.group is not None):
            raise HostStoreError(
                f"expert layout: int4 (uint8) weights need a group size and only they take one, got "
                f"dtype {self.dtype} with group {self.group}"
            )
        if self.group is not None and (self.hidden % 8 or self.inter % 8 or self.inter != self.inter_real):
            raise HostStoreError(
                f"expert layout: int4 experts need hidden size and intermediate size to be multiples "
                f"of 8 (eight 4-bit values a word), got {self.hidden} and {self.inter}"
            )

    @classmethod
    def for_config(cls, cfg: GlmMoeDsaConfig, expert_dtype: ExpertDtype = "checkpoint") -> ExpertLayout:
        """The layout of `cfg`'s routed experts as loaded with `expert_dtype` (see `GlmMoeDsaConfig.expert_format`)."""
        K, I = cfg.hidden_size, cfg.moe_intermediate_size
        fmt = cfg.expert_format(expert_dtype)
        if fmt == "int4":
            pq = cfg.pack_quantization
            return cls(
                cfg.n_routed_experts, K, I, I, torch.uint8, None, int4.GROUP_SIZE if pq is None else pq.group_size
            )
        if fmt == "bf16":
            return cls(cfg.n_routed_experts, K, I, I, torch.bfloat16, None)
        assert cfg.quantization is not None
        bn, bk = cfg.quantization.block_n, cfg.quantization.block_k
        step = math.lcm(bn, bk)
        return cls(cfg.n_routed_experts, K, -(-I // step) * step, I, torch.float8_e4m3fn, (bn, bk))

    @property
    def format(self) -> ExpertFormat:
        return "int4" if self.group is not None else "fp8" if self.block is not None else "bf16"

    @property
    def is_fp8(self) -> bool:
        return self.block is not None

    @property
    def is_int4(self) -> bool:
        return self.group is not None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        K, N = self.hidden, self.inter
        if self.group is not None:
            g13, g2 = int4.num_groups(K, self.group), int4.num_groups(N, self.group)
            return {
                "w13": (2 * N, K // 2),
                "w2": (K, N // 2),
                "w13_scale": (2 * N, g13),
                "w2_scale": (K, g2),
                "w13_zeros": (2 * N // 8, g13),
                "w2_zeros": (K // 8, g2),
            }
        out: dict[str, tuple[int, ...]] = {"w13": (2 * N, K), "w2": (K, N)}
        if self.block is not None:
            bn, bk = self.block
            out["w13_scale"] = (2 * N // bn, -(-K // bk))
            out["w2_scale"] = (-(-K // bn), N // bk)
        return out

    def section_dtype(self, name: str) -> torch.dtype:
        if name.endswith("zeros"):
            return torch.int32
        if name.endswith("scale"):
            return torch.bfloat16 if self.is_int4 else torch.float32
        return self.dtype

    def moe_kwargs(self, weights: dict[str, torch.Tensor]) -> dict:
        """The fused-MoE kernel's (and its reference's) keyword arguments besides w13 and w2, for slot pools or
        stacks `weights` of this layout (section name -> [S, ...])."""
        if self.is_int4:
            return {
                "w13_scale": weights["w13_scale"],
                "w2_scale": weights["w2_scale"],
                "w13_zeros": weights["w13_zeros"],
                "w2_zeros": weights["w2_zeros"],
                "group": self.group,
            }
        if self.is_fp8:
            return {"w13_scale": weights["w13_scale"], "w2_scale": weights["w2_scale"], "block_shape": self.block}
        return {}

    def write_expert(self, views: dict[str, torch.Tensor], weights: ExpertWeights, where: str) -> None:
        """Write one expert into `views` (section name -> this expert's [...] view, as `shapes`); `where` names the
        expert in errors (HostStoreError: a format, shape or group that this layout cannot hold)."""
        I, N, K = self.inter_real, self.inter, self.hidden
        fmt = "int4" if weights.is_int4 else "fp8" if weights.is_fp8 else "bf16"
        if (fmt == "int4") != self.is_int4 or (fmt == "fp8" and not self.is_fp8):
            hint = " (quantise them at load with expert_dtype 'int4')" if self.is_int4 else ""
            raise HostStoreError(
                f"{where}: weights are {fmt} ({weights.gate_proj.dtype}), the store holds {self.format} experts{hint}"
            )
        pack = 2 if self.is_int4 else 1
        for name, w, shape in (
            ("gate_proj", weights.gate_proj, (I, K // pack)),
            ("up_proj", weights.up_proj, (I, K // pack)),
            ("down_proj", weights.down_proj, (K, I // pack)),
        ):
            if tuple(w.shape) != shape:
                raise HostStoreError(f"{where}: {name} has shape {list(w.shape)}, expected {list(shape)}")
        if self.is_int4:
            self._write_int4(views, weights, where)
            return
        w13, w2 = views["w13"], views["w2"]
        if N != I:
            w13.view(torch.uint8).zero_()
            w2.view(torch.uint8).zero_()
        w13[:I].copy_(weights.gate_proj.to(self.dtype))
        w13[N : N + I].copy_(weights.up_proj.to(self.dtype))
        w2[:, :I].copy_(weights.down_proj.to(self.dtype))
        if self.block is not None:
            bn = self.block[0]
            s13, s2 = views["w13_scale"], views["w2_scale"]
            s13.fill_(1.0)
            s2.fill_(1.0)
            gs, us, ds = weights.gate_scale_inv, weights.up_scale_inv, weights.down_scale_inv
            rows = -(-I // bn)
            assert gs is not None and us is not None and ds is not None
            s13[:rows].copy_(gs)
            s13[N // bn : N // bn + rows].copy_(us)
            s2[:, : ds.shape[1]].copy_(ds)

    def _write_int4(self, views: dict[str, torch.Tensor], weights: ExpertWeights, where: str) -> None:
        gate, up, down = (w.with_zero_points() for w in weights.int4())
        if gate.group != self.group:
            raise HostStoreError(f"{where}: int4 group size {gate.group}, the store holds group {self.group}")
        for dst, parts in (
            ("w13", (gate.qweight, up.qweight)),
            ("w2", (down.qweight,)),
            ("w13_scale", (gate.scales, up.scales)),
            ("w2_scale", (down.scales,)),
            ("w13_zeros", (gate.zeros, up.zeros)),
            ("w2_zeros", (down.zeros,)),
        ):
            view, rows = views[dst], 0
            for part in parts:
                if tuple(part.shape[1:]) != tuple(view.shape[1:]):
                    raise HostStoreError(
                        f"{where}: int4 {dst} part has shape {list(part.shape)}, the store's rows "
                        f"are {list(view.shape[1:])}"
                    )
                view[rows : rows + part.shape[0]].copy_(part)
                rows += part.shape[0]
            assert rows == view.shape[0], (where, dst, rows)

    @property
    def section_bytes(self) -> dict[str, int]:
        return {n: math.prod(s) * self.section_dtype(n).itemsize for n, s in self.shapes.items()}

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert occupies in a slab and in a GPU slot (padding included)."""
        return sum(self.section_bytes.values())

    @property
    def section_offsets(self) -> dict[str, int]:
        offs, pos = {}, 0
        for name, nbytes in self.section_bytes.items():
            offs[name] = pos
            pos += -(-nbytes * self.num_experts // SECTION_ALIGN) * SECTION_ALIGN
        return offs

    @property
    def slab_bytes(self) -> int:
        last = list(self.section_bytes)[-1]
        return self.section_offsets[last] + self.section_bytes[last] * self.num_experts


def _memlock_text() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else f"{v / 2**30:.2f} GiB"

    return f"RLIMIT_MEMLOCK soft {fmt(soft)}, hard {fmt(hard)}"


def default_host_alloc() -> HostAlloc:
    """$MOED_HOST_ALLOC if set (torch, mmap or huge), else torch."""
    value = os.environ.get("MOED_HOST_ALLOC", "torch")
    if value not in HOST_ALLOCS:
        raise HostStoreError(f"MOED_HOST_ALLOC={value!r}: expected one of {', '.join(HOST_ALLOCS)}")
    return value  # type: ignore[return-value]


def thp_status() -> dict[str, str | int]:
    """The kernel's transparent-huge-page mode ([bracketed] in sysfs) and this process's THP-backed bytes."""
    out: dict[str, str | int] = {"enabled": "unavailable"}
    try:
        text = THP_ENABLED.read_text()
        out["enabled"] = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                out["anon_huge_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class _MappedBuffer:
    """An anonymous mapping (optionally THP-advised and 2 MiB-aligned), registered with CUDA when pinned.

    The tensor views it through `torch.frombuffer`, which keeps the mapping alive; this object unregisters
    the pages from CUDA when it goes (the store holds it as long as its slabs)."""

    def __init__(self, nbytes: int, huge: bool, pin: bool) -> None:
        align = HUGE_PAGE if huge else mmap.PAGESIZE
        self.map = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            self.map.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(self.map, dtype=torch.uint8)
        start = -whole.data_ptr() % align
        self.tensor = whole[start : start + nbytes]
        self.tensor.zero_()  # fault the pages in with torch's threads (cudaHostRegister would do it on one)
        self.registered = False
        if pin:
            # portable | mapped: every context sees it and the kernels' UVA loads reach it by its host address
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, REGISTER_PORTABLE_MAPPED)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: error {int(err)}")
            self.registered = True

    def __del__(self) -> None:
        if self.registered:
            unregister = getattr(torch.cuda.cudart(), "cudaHostUnregister", None)
            if unregister is not None:
                unregister(self.tensor.data_ptr())
            self.registered = False


def allocate_pinned(
    nbytes: int, what: str, pin: bool, alloc: HostAlloc = "torch", keep: list | None = None
) -> torch.Tensor:
    """A uint8 host buffer of exactly `nbytes` (torch: rounded up inside its allocator), page-locked when `pin`;
    a clear error when the OS refuses. mmap/huge buffers are owned by an object appended to `keep`."""
    if alloc not in HOST_ALLOCS:
        raise HostStoreError(f"host allocation {alloc!r} for {what}: expected one of {', '.join(HOST_ALLOCS)}")
    try:
        if alloc == "torch":
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        buf = _MappedBuffer(nbytes, huge=alloc == "huge", pin=pin)
        if keep is not None:
            keep.append(buf)
        return buf.tensor
    except (RuntimeError, OSError) as e:
        raise HostStoreError(
            f"cannot {'pin' if pin else 'allocate'} {nbytes / 2**30:.2f} GiB of host memory for {what} ({e}); "
            f"{_memlock_text()}. Raise the limit (`ulimit -l unlimited`, or LimitMEMLOCK=infinity in the systemd "
            "unit) or lower the need: serve the FP8 checkpoint (half the bytes of bf16) or give this rank fewer "
            "offloaded layers (HostExpertStore(layers=...), i.e. more tensor/pipeline-parallel ranks)"
        ) from None


class HostExpertStore:
    """Pinned host slabs, one per MoE layer; views of each expert's sections."""

    def __init__(
        self, layout: ExpertLayout, layers: list[int], pin: bool | None = None, alloc: HostAlloc | None = None
    ) -> None:
        if pin is None:
            pin = torch.cuda.is_available()
        self.layout, self.layers, self.pinned = layout, list(layers), pin
        self.alloc: HostAlloc = alloc or default_host_alloc()
        total = layout.slab_bytes * len(self.layers)
        self._buffers: list[_MappedBuffer] = []
        self.slabs: dict[int, torch.Tensor] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        t0 = time.perf_counter()
        for layer in self.layers:
            slab = allocate_pinned(
                layout.slab_bytes,
                f"MoE layer {layer}'s experts (of {len(self.layers)} layers, {total / 2**30:.2f} GiB in all)",
                pin,
                self.alloc,
                self._buffers,
            )
            self.slabs[layer] = slab
            self._views[layer] = self._section_views(slab)
        self.alloc_s = time.perf_counter() - t0
        log.info(
            "host expert store: %d layers x %.2f GB = %.2f GB %s (%s allocation) in %.1f s",
            len(self.layers),
            layout.slab_bytes / 1e9,
            total / 1e9,
            "pinned" if pin else "pageable",
            self.alloc,
            self.alloc_s,
        )
        self._loaded = {layer: torch.zeros(layout.num_experts, dtype=torch.bool) for layer in self.layers}

    @property
    def reserved_bytes(self) -> int:
        """Host bytes the slabs hold, allocator rounding included (torch rounds each slab up to a power of two)."""
        per = self.layout.slab_bytes
        if self.alloc == "torch" and self.pinned:
            per = 1 << (per - 1).bit_length()
        return per * len(self.layers)

    def _section_views(self, slab: torch.Tensor) -> dict[str, torch.Tensor]:
        L, views = self.layout, {}
        for name, shape in L.shapes.items():
            nbytes = L.section_bytes[name] * L.num_experts
            off = L.section_offsets[name]
            views[name] = slab[off : off + nbytes].view(L.section_dtype(name)).view(L.num_experts, *shape)
        return views

    def sections(self, layer: int) -> dict[str, torch.Tensor]:
        """Section name -> [E, ...] view of the layer's slab (see the module docstring)."""
        return self._views[layer]

    def section_bytes_of(self, layer: int) -> dict[str, torch.Tensor]:
        """Section name -> [E, section_bytes] uint8 view (what the copy kernels read)."""
        L = self.layout
        return {n: v.view(L.num_experts, -1).view(torch.uint8) for n, v in self._views[layer].items()}

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        if layer not in self.slabs:
            raise HostStoreError(f"MoE layer {layer} is not offloaded by this store (layers {self.layers})")
        L = self.layout
        if not 0 <= expert < L.num_experts:
            raise HostStoreError(f"layer {layer}: expert {expert} out of range [0, {L.num_experts})")
        L.write_expert({n: t[expert] for n, t in self._views[layer].items()}, weights, f"layer {layer} expert {expert}")
        self._loaded[layer][expert] = True

    def mark_loaded(self, layer: int) -> None:
        """Every expert of `layer` was written into its slab by other means (a benchmark drawing random experts
        straight into the pinned slab)."""
        self._loaded[layer].fill_(True)

    def finish_loading(self) -> None:
        for layer, done in self._loaded.items():
            missing = (~done).nonzero().flatten().tolist()
            if missing:
                raise HostStoreError(
                    f"MoE layer {layer}: experts {missing[:8]} ({len(missing)} in all) were never "
                    "loaded into the host store"
                )

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {n: t[expert] for n, t in self._views[layer].items()}

    def fill_from_checkpoint(self, directory: str | Path, cfg: GlmMoeDsaConfig) -> int:
        """Fill every slab from a checkpoint, one shard file after another; returns bytes read. An int4 store filled
        from a bf16 or FP8 checkpoint quantises each expert as it is read, as `--expert-dtype int4` does at load
        (on the GPU when there is one)."""
        ckpt = Checkpoint(directory)
        qdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        by_shard: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for layer in self.layers:
            for e in range(self.layout.num_experts):
                name = expert_names(layer, e)["gate_proj"]
                stored = stored_names(ckpt, name)  # the weight, or its pack-quantized parts
                if not stored:
                    raise HostStoreError(f"{ckpt.dir}: tensor {name} is missing (layer {layer} expert {e})")
                by_shard[ckpt.weight_map[stored[0]]].append((layer, e))
        total = 0
        try:
            for shard in sorted(by_shard):
                for layer, e in by_shard[shard]:
                    weights, nbytes = read_expert(ckpt, cfg, layer, e)
                    if self.layout.is_int4 and not weights.is_int4:
                        weights = quantize_expert(weights, cfg, qdev)
                    self.load_expert(layer, e, weights)
                    total += nbytes
                ckpt.close()  # drop this shard's memory map before the next one
        finally:
            ckpt.close()
        self.finish_loading()
        return total
