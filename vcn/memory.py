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

The opposite case is a loop that allocates and frees the same large buffers
over and over (a network's activations, batch after batch). glibc maps each
block above its mmap threshold (at most 32 MiB) afresh and unmaps it on
free, so the kernel faults in and zeroes every page of it again on the next
batch: embedding with SFace on a 2-core CPU spent a third of its CPU time in
the kernel that way. :func:`heap_reused` keeps such blocks in the heap for
the loop's length.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Within :func:`heap_reused`: no block is mapped on its own nor the heap trimmed below 1 GiB of free top.
_REUSE_THRESHOLD = 1 << 30
#: After it: the ceilings glibc's own sliding thresholds reach once large blocks were freed
#: (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit systems, and twice that for the trim).
_MMAP_THRESHOLD_AFTER = 32 << 20
_TRIM_THRESHOLD_AFTER = 64 << 20


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
    return trim_heap()


@contextmanager
def heap_reused() -> Iterator[bool]:
    """Inside, freed large blocks stay in the C heap for the next allocation; on leaving, they go back.

    For loops that allocate and free the same large buffers over and over (a
    network's activations, batch after batch): glibc would map each block above
    its threshold afresh and unmap it on free, and the kernel would fault in and
    zero its pages again every time. Inside, no block is mapped on its own and
    the heap is not trimmed, so a batch reuses the pages of the one before.
    On leaving, the thresholds are set to the ceilings glibc's own sliding
    thresholds reach after large frees (32 MiB, 64 MiB trim: setting them once
    ends the sliding), and the free pages go back to the system
    (:func:`release_freed_memory`).

    Yields:
        Whether the allocator was tuned: False where the C library has no
        ``mallopt``/``malloc_trim`` (musl, macOS), where the loop runs as it is.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield False
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _REUSE_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_THRESHOLD)
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
        release_freed_memory()


def trim_heap() -> bool:
    """Hands the C heap's free pages back to the system (glibc's ``malloc_trim``), without collecting garbage.

    Inside :func:`heap_reused`, once per chunk of many batches: the pages of blocks freed in holes the next
    batches cannot fit would otherwise stay resident and pile up (measured on 6,144 chips with SFace:
    933 -> 1,041 MB across the chunks without it, flat at 538-540 MB with it, at the same speed).

    Returns:
        Whether the heap was trimmed: False where the C library has no ``malloc_trim`` (musl, macOS).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
