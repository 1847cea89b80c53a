"""Returning memory to the OS after huge transient allocations (glibc malloc; a no-op elsewhere).

A long prompt allocates tens of MB for a moment (the message, its text, its encoding). glibc keeps
freed heap memory for reuse, and after freeing an mmapped block it raises its mmap threshold to
that block's size, so the next big buffers come from the heap and stay resident: a daemon that saw
a few huge prompts kept their peak for good. `limit_heap_growth` pins the threshold (buffers of
256 KiB and more are mmapped and unmapped on free) and `trim` hands the heaps' free tops back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 256 << 10
_M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_libc = _glibc()


def limit_heap_growth() -> None:
    """Keep big allocations out of the heap for the life of the process."""
    if _libc is not None and not _libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        log.warning("mallopt(M_MMAP_THRESHOLD) failed; big prompts may leave memory resident")


def trim() -> None:
    """Give free heap memory back to the OS (takes ms; call off the event loop, after a big allocation)."""
    if _libc is not None:
        _libc.malloc_trim(0)
