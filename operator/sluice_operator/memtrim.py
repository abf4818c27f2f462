"""Giving freed memory back to the system after a burst (glibc only; elsewhere a no-op).

At start-up kopf handles every object at once: a thousand policies open a thousand TLS
connections to the API server (asyncio keeps 128 KiB of buffers per connection), closed again
once idle. CPython frees those buffers, but glibc keeps the freed heap pages mapped: without a
trim the operator's RSS stays at its start-up peak for good."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("sluice.operator")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """``malloc_trim(0)``: return the free pages of the heap to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
