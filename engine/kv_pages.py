"""KV capacity in pages: the free list, and each sequence's page list.

The KV pool is `num_pages` pages of `page_size` token positions; page ids are
`first_page .. first_page + num_pages - 1` (paged attention pools reserve page 0 as the scratch page
that padded CUDA-graph rows write to, so the engine hands out ids from 1 there).
A sequence's `pages` list maps positions to pages: position `p` lives in page `pages[p // page_size]`
at offset `p % page_size`, so a sequence of `n` cached tokens holds `ceil(n / page_size)` pages. The
page table a paged attention backend reads is these lists, one row per sequence, padded.

This module only counts and hands out page ids; the pool tensors belong to the attention backend.
With the reference backend (which keeps per-sequence growing caches) the accounting is still real:
the scheduler admits and preempts by these numbers, so the same scheduler drives a paged backend.
The MTP draft worker's pool is indexed by the same page lists (it writes positions the target has
reserved), so drafting needs no pages of its own.
"""

from __future__ import annotations

import torch

from moed.attention.paged_kv import PagedKVPool
from moed.engine.sequence import Sequence
from moed.model.config import GlmMoeDsaConfig


class KVPages:
    def __init__(self, num_pages: int, page_size: int, first_page: int = 0) -> None:
        if num_pages <= 0:
            raise ValueError(f"kv pages must be positive, got {num_pages}")
        if page_size <= 0:
            raise ValueError(f"page size must be positive, got {page_size}")
        self.num_pages, self.page_size, self.first_page = num_pages, page_size, first_page
        # LIFO: the page freed last is reused first (its lines are likeliest still in L2).
        self._free = list(range(first_page + num_pages - 1, first_page - 1, -1))
        self._in_use = bytearray(first_page + num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_pages

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def pages_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` must still get to hold `num_tokens` positions."""
        return max(0, self.pages_for(num_tokens) - len(seq.pages))

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq.pages` to hold `num_tokens` positions; False (and nothing taken) if too few are free."""
        need = self.pages_missing(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            page = self._free.pop()
            self._in_use[page] = 1
            seq.pages.append(page)
        return True

    def release(self, seq: Sequence) -> None:
        """Return every page of `seq` to the free list."""
        self._give_back(seq.pages)
        seq.pages = []

    def _give_back(self, pages: list[int]) -> None:
        for page in reversed(pages):
            if not self._in_use[page]:
                raise RuntimeError(f"KV page {page} freed twice (pool of {self.num_pages} pages)")
            self._in_use[page] = 0
            self._free.append(page)


def kv_page_bytes(cfg: GlmMoeDsaConfig, page_size: int, latent_dtype: str, index_dtype: str, layers: list[int]) -> int:
    """Device bytes of one KV page over `layers` (latent + rope key, and index-K where the layer indexes)."""
    lat, idx = PagedKVPool.bytes_per_token(cfg, latent_dtype, index_dtype)
    n_index = sum(1 for layer in layers if layer >= cfg.num_hidden_layers or cfg.indexer_types[layer] == "full")
    return page_size * (len(layers) * lat + n_index * idx)


def kv_pages_wanted(max_running: int, max_model_len: int, page_size: int) -> int:
    """Pages for max_running sequences of max_model_len (+ the scratch page)."""
    return max_running * -(-max_model_len // page_size) + 1


def kv_pages_fitting(wanted: int, paged: bool, device: torch.device, page_bytes: int, memory_fraction: float) -> int:
    """`wanted` pages, or fewer where a paged pool on the GPU would not fit `memory_fraction` of the free memory."""
    if not paged or device.type != "cuda":
        return wanted
    free = torch.cuda.mem_get_info(device)[0]
    pages = int(free * memory_fraction) // page_bytes - 1
    if pages < 1:
        raise ValueError(
            f"no device memory left for the KV pool: {free / 2**30:.2f} GiB free after loading, "
            f"one page needs {page_bytes / 2**20:.2f} MiB (lower expert_cache_gb or set kv_pages)"
        )
    return min(pages, wanted)
