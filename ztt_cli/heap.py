"""Giving the C heap's freed memory back to the system between the steps of a fit.

A fit allocates and frees many tensors of a few megabytes (a layer's activations for one window).
glibc's malloc raises its mmap threshold each time it frees a large block, so such tensors come from
the heap afterwards, and the heap keeps the pages they leave free: resident memory then grows from
step to step and phase to phase while the live tensors stay the same size. ``malloc_trim`` hands
those free pages back. Elsewhere than glibc there is nothing to call and nothing happens."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim(0)``); a no-op without it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
