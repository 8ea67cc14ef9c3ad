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
the kernel that way. :func:`heap_reused` keeps such blocks (up to 32 MiB) in
the heap for the loop's length, and the loop keeps its buffers below that.
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
#: The thresholds :func:`heap_reused` fixes: the ceilings glibc's own sliding ones reach once large blocks
#: were freed (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit systems, and twice that for the trim). The mmap one is
#: the largest block a loop inside should allocate: larger ones are mapped on their own.
HEAP_REUSED_MAX_BLOCK = 32 << 20
_HEAP_REUSED_TRIM = 2 * HEAP_REUSED_MAX_BLOCK


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
    """Inside, freed blocks of up to 32 MiB stay in the C heap for the next allocation; on leaving, they go back.

    For loops that allocate and free the same large buffers over and over (a
    network's activations, batch after batch): glibc's sliding threshold starts
    at 128 KiB, so such blocks are mapped afresh and unmapped on free until a
    large one was freed, and the kernel faults in and zeroes their pages every
    time. Inside, the thresholds are fixed at the ceilings glibc's would reach
    (blocks up to 32 MiB come from the heap, which keeps up to 64 MiB of free
    pages at its top; setting them once ends the sliding), so a batch reuses the
    pages of the one before. On leaving, the free pages go back to the system
    (:func:`release_freed_memory`); the thresholds stay fixed.

    The thresholds are not raised further: with no block mapped on its own and
    no trim (1 GiB thresholds), SFace's embedding loop kept every freed hole in
    the heap and its working set wandered from chunk to chunk (8 chunks of 512
    chips from 458 MiB, buffers under 32 MiB: chunk peaks 824-860 MiB); at the
    ceilings it stays at 702-704 MiB after the first chunk's 830, at the same
    speed (111 and 115 s).

    Yields:
        Whether the allocator was tuned: False where the C library has no
        ``mallopt``/``malloc_trim`` (musl, macOS), where the loop runs as it is.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield False
        return
    libc.mallopt(_M_MMAP_THRESHOLD, HEAP_REUSED_MAX_BLOCK)
    libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_REUSED_TRIM)
    try:
        yield True
    finally:
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
