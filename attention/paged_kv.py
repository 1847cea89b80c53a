"""Paged KV pools of the DSA/MLA backends: the MLA latent cache and the indexer's key cache.

Both pools are split into pages of `page_size` token positions (default 64). A sequence owns a list
of pages; its page table row maps position p to pool page `page_table[b, p // page_size]`, slot
`p % page_size`. Every layer uses the same page table, so one allocation covers all layers. Page 0
is reserved: it is never handed out, and padded page-table rows (CUDA-graph batches) point at it.

Byte layouts (C = kv_lora_rank, R = qk_rope_head_dim, D = index_head_dim; GLM-5.1: 512, 64, 128):

MLA latent pool `latent`, one row per token, rows contiguous within a page, pages contiguous, layers
outermost: shape [layers, num_pages, page_size, row].
- "bf16": row = [latent C x bf16 | k_rope R x bf16]; 2(C+R) B = 1152 B (FlashMLA / flashinfer's
  dense MLA layout, so the trtllm path reads it as is). dtype bfloat16, row = C + R elements.
- "fp8": row = [latent C x e4m3 | k_rope R x bf16 | scale fp32 | zero pad to a multiple of 16 B];
  C + 2R + 4 rounded up to 16 B = 656 B. latent = e4m3 * scale (one scale per token, amax / 448);
  the rotary part stays bf16 (positions are not quantised). dtype uint8, row = bytes.
- "fp32": as "bf16" with fp32 elements (exactness tests only).

Indexer key pool `index_k`, for the layers that run an indexer: shape [index_layers, num_pages, ...].
- "fp8": one page = [page_size x D e4m3 keys | page_size x fp32 scales]; page_size (D + 4) B =
  8448 B at 64 x 128 (DeepGEMM's paged layout: 16-B aligned key rows, scales after them).
  key = e4m3 * scale, one scale per token (amax / 448). dtype uint8, [.., page_size * (D + 4)].
- "bf16" / "fp32": [.., page_size, D] in that dtype (bf16 matches the bf16 model's own scores bit
  for bit; used by parity tests).

Writes (`store`) are plain torch index_put on views: no host sync, capturable in a CUDA graph.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from moed.model.attention_interface import PagedStep, SequenceStep
from moed.model.config import GlmMoeDsaConfig

FP8_MAX = 448.0  # largest finite float8_e4m3fn
LATENT_DTYPES = ("bf16", "fp8", "fp32")
INDEX_DTYPES = ("fp8", "bf16", "fp32")
_TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}


class PoolExhausted(RuntimeError):
    """No free page is left in the pool."""


@dataclasses.dataclass(frozen=True)
class LatentView:
    """One layer of the latent pool as element views: nope [pages, page, C], rope [pages, page, R],
    scale [pages, page] fp32 or None. Row stride is not 1 (the parts share rows)."""

    nope: torch.Tensor
    rope: torch.Tensor
    scale: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class IndexKView:
    """One layer of the index-K pool: k [pages, page, D], scale [pages, page] fp32 or None."""

    k: torch.Tensor
    scale: torch.Tensor | None


def fp8_row_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    return -(-(kv_lora_rank + 2 * rope_dim + 4) // 16) * 16


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [tokens, D] -> (e4m3 [tokens, D], fp32 scale [tokens]) with x ~ e4m3 * scale."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class PagedKVPool:
    """Latent and index-K pools for `layers` (main layers, then MTP layers), plus a page free list.

    The free list serves runs without an engine (tests, benchmarks, `new_sequence`); an engine may
    manage pages itself and only pass page tables in `PagedStep`.
    """

    def __init__(
        self,
        cfg: GlmMoeDsaConfig,
        num_pages: int,
        page_size: int = 64,
        latent_dtype: str = "bf16",
        index_dtype: str = "fp8",
        device: torch.device | str = "cpu",
        layers: list[int] | None = None,
    ) -> None:
        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent KV dtype '{latent_dtype}' is not supported (choose from {LATENT_DTYPES})")
        if index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index-K dtype '{index_dtype}' is not supported (choose from {INDEX_DTYPES})")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.cfg = cfg
        self.page_size, self.num_pages = page_size, num_pages
        self.latent_dtype, self.index_dtype = latent_dtype, index_dtype
        self.device = torch.device(device)
        C, R, D = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
        self.layers = list(layers) if layers is not None else list(range(cfg.num_hidden_layers)) + cfg.mtp_layer_ids
        self.layer_slot = {layer: i for i, layer in enumerate(self.layers)}
        self.index_layers = [
            layer for layer in self.layers if layer >= cfg.num_hidden_layers or cfg.indexer_types[layer] == "full"
        ]
        self.index_slot = {layer: i for i, layer in enumerate(self.index_layers)}
        L, Li = len(self.layers), len(self.index_layers)
        if latent_dtype == "fp8":
            self.latent_row_bytes = fp8_row_bytes(C, R)
            self.latent = torch.zeros(
                L, num_pages, page_size, self.latent_row_bytes, dtype=torch.uint8, device=self.device
            )
        else:
            dt = _TORCH[latent_dtype]
            self.latent_row_bytes = (C + R) * dt.itemsize
            self.latent = torch.zeros(L, num_pages, page_size, C + R, dtype=dt, device=self.device)
        if index_dtype == "fp8":
            self.index_k = torch.zeros(Li, num_pages, page_size * (D + 4), dtype=torch.uint8, device=self.device)
        else:
            self.index_k = torch.zeros(Li, num_pages, page_size, D, dtype=_TORCH[index_dtype], device=self.device)
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))

    @staticmethod
    def bytes_per_token(cfg: GlmMoeDsaConfig, latent_dtype: str, index_dtype: str) -> tuple[int, int]:
        """(latent bytes, index-K bytes) one token costs in one layer."""
        C, R, D = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
        lat = fp8_row_bytes(C, R) if latent_dtype == "fp8" else (C + R) * _TORCH[latent_dtype].itemsize
        idx = D + 4 if index_dtype == "fp8" else D * _TORCH[index_dtype].itemsize
        return lat, idx

    # -- pages ---------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"KV pool: {n} pages requested, {len(self._free)} of {self.num_pages - 1} free")
        return [self._free.popleft() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(pages)

    # -- views ---------------------------------------------------------------------------------
    def latent_view(self, layer: int) -> LatentView:
        C, R = self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
        t = self.latent[self._slot(layer)]
        if self.latent_dtype != "fp8":
            return LatentView(t[..., :C], t[..., C:], None)
        nope = t[..., :C].view(torch.float8_e4m3fn)
        rope = t[..., C : C + 2 * R].view(torch.bfloat16)
        s0 = -(-(C + 2 * R) // 4) * 4
        scale = t[..., s0 : s0 + 4].view(torch.float32)[..., 0]
        return LatentView(nope, rope, scale)

    def index_view(self, layer: int) -> IndexKView:
        if layer not in self.index_slot:
            raise KeyError(f"layer {layer} has no indexer (indexer_types) and so no index-K cache")
        t = self.index_k[self.index_slot[layer]]
        if self.index_dtype != "fp8":
            return IndexKView(t, None)
        P, D = self.page_size, self.cfg.index_head_dim
        k = t[:, : P * D].view(torch.float8_e4m3fn).view(self.num_pages, P, D)
        scale = t[:, P * D :].view(torch.float32)
        return IndexKView(k, scale)

    def _slot(self, layer: int) -> int:
        if layer not in self.layer_slot:
            raise KeyError(f"layer {layer} is not in this KV pool (layers {self.layers[0]}..{self.layers[-1]})")
        return self.layer_slot[layer]

    # -- writes --------------------------------------------------------------------------------
    def slots(self, paged: PagedStep, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) int64 [tokens] where each new token of the step is written."""
        P = self.page_size
        page = paged.page_table[paged.token_seq.long(), torch.div(positions, P, rounding_mode="floor").long()]
        return page.long(), (positions % P).long()

    def store(
        self,
        layer: int,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        index_k: torch.Tensor | None,
        page: torch.Tensor,
        offset: torch.Tensor,
    ) -> None:
        """latent: [tokens, C], k_rope: [tokens, R], index_k: [tokens, D] or None (layer without indexer)."""
        lv = self.latent_view(layer)
        if self.latent_dtype == "fp8":
            q, scale = quantize_rows_fp8(latent)
            lv.nope.view(torch.uint8)[page, offset] = q.view(torch.uint8)
            lv.scale[page, offset] = scale
            lv.rope[page, offset] = k_rope.to(torch.bfloat16)
        else:
            lv.nope[page, offset] = latent.to(lv.nope.dtype)
            lv.rope[page, offset] = k_rope.to(lv.rope.dtype)
        if index_k is None:
            return
        iv = self.index_view(layer)
        if self.index_dtype == "fp8":
            q, scale = quantize_rows_fp8(index_k)
            iv.k.view(torch.uint8)[page, offset] = q.view(torch.uint8)
            iv.scale[page, offset] = scale
        else:
            iv.k[page, offset] = index_k.to(iv.k.dtype)

    # -- host-side reads (tests, debugging) -----------------------------------------------------
    def read_latent(self, layer: int, pages: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised (latent [length, C] fp32, k_rope [length, R] fp32) of one sequence."""
        lv = self.latent_view(layer)
        page, off = self._positions(pages, length)
        nope = lv.nope[page, off].float()
        if lv.scale is not None:
            nope = nope * lv.scale[page, off][:, None]
        return nope, lv.rope[page, off].float()

    def read_index_k(self, layer: int, pages: list[int], length: int) -> torch.Tensor:
        iv = self.index_view(layer)
        page, off = self._positions(pages, length)
        k = iv.k[page, off].float()
        return k * iv.scale[page, off][:, None] if iv.scale is not None else k

    def _positions(self, pages: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, device=self.device)
        table = torch.tensor(pages, dtype=torch.long, device=self.device)
        return table[pos // self.page_size], pos % self.page_size


def is_paged(backend: object) -> bool:
    """Whether an attention backend keeps its KV cache in a PagedKVPool (and so reads `StepContext.paged`)."""
    return isinstance(getattr(backend, "pool", None), PagedKVPool)


class PagedSequence:
    """A sequence's pages in a `PagedKVPool` (the per-sequence handle of `SequenceStep.kv`)."""

    def __init__(self, pool: PagedKVPool) -> None:
        self.pool = pool
        self.pages: list[int] = []

    def reserve(self, length: int) -> None:
        """Make sure positions [0, length) have pages."""
        need = -(-length // self.pool.page_size) - len(self.pages)
        if need > 0:
            self.pages += self.pool.allocate(need)

    def release(self) -> None:
        self.pool.release(self.pages)
        self.pages = []

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rejected speculative drafts); whole pages past it are freed."""
        keep = -(-length // self.pool.page_size)
        self.pool.release(self.pages[keep:])
        del self.pages[keep:]


def build_paged_step(
    seqs: list[SequenceStep], page_size: int, device: torch.device | str, pad_pages_to: int = 1
) -> PagedStep:
    """A `PagedStep` from `PagedSequence` handles (reserving pages as needed), built on the host.

    For runs without an engine; the engine builds the same tensors in its own (static) buffers.
    """
    handles = []
    for i, s in enumerate(seqs):
        if not isinstance(s.kv, PagedSequence):
            raise TypeError(
                f"seqs[{i}].kv is {type(s.kv).__name__}, expected a PagedSequence from this backend's new_sequence()"
            )
        s.kv.reserve(s.context_len)
        handles.append(s.kv)
    max_pages = max(1, max(len(h.pages) for h in handles))
    max_pages = -(-max_pages // pad_pages_to) * pad_pages_to
    table = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    for i, h in enumerate(handles):
        table[i, : len(h.pages)] = torch.tensor(h.pages, dtype=torch.int32)
    lens = torch.tensor([s.context_len for s in seqs], dtype=torch.int32)
    new = torch.tensor([s.num_new for s in seqs], dtype=torch.int32)
    start = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    start[1:] = torch.cumsum(new, 0)
    token_seq = torch.repeat_interleave(torch.arange(len(seqs), dtype=torch.int32), new.long())
    dev = torch.device(device)
    return PagedStep(
        page_table=table.to(dev),
        seq_lens=lens.to(dev),
        query_start=start.to(dev),
        token_seq=token_seq.to(dev),
        max_context=max(int(lens.max()), 1),
        max_new=max(int(new.max()), 1),
    )
