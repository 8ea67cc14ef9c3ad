"""Handing freed memory back to the system between the stages of a long run.

A stage that builds large tables from many small allocations (the detections of
a feature film, the crops of its tracks) frees them when it ends, but glibc's
allocator keeps the freed pages of its heap for later use unless they sit at
its very top. One process runs every stage of ``vcn process``, so without help
the next stages start on top of what earlier ones left: measured on a 2-hour
film, 260 MB of freed heap after detection alone, and the embedding stage's
peak rose with the length of the movie by that much. Arrow's memory pool
(mimalloc in the pyarrow wheels) keeps its freed pages too, out of glibc's
reach: reading a 20-minute film's detection chips for the crops left 150 MB
there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Collects garbage, then returns the free pages of Arrow's memory pool and of the C heap to the system
    (glibc's ``malloc_trim``).

    Returns:
        Whether the heap was trimmed: False where the C library has no ``malloc_trim`` (musl, macOS),
        which then only collects garbage and releases Arrow's pool.
    """
    gc.collect()
    arrow = sys.modules.get("pyarrow")  # only where it is in use: importing it here would cost memory
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
