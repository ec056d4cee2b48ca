"""Handing freed native memory back to the operating system (glibc's ``malloc_trim``).

A session frees megabytes of native buffers when it ends (its engine's caches and frame ring, x264's and the
peers' buffers), but glibc keeps freed chunks in its per-thread arenas, so the server's resident memory would creep
up from one session to the next. Trimming after each session returns them: RSS stays flat over back-to-back
sessions (bench/RESULTS.md, "Soak").
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the process runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_memory() -> bool:
    """Return the allocator's free memory to the OS (blocks for milliseconds: call it off the event loop); False
    where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
