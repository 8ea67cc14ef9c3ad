"""Freed heap memory goes back to the system between stages."""

from __future__ import annotations

import ctypes

import psutil
import pytest

from vcn.memory import _libc, release_freed_memory


@pytest.mark.skipif(_libc() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_pages_go_back_to_the_system():
    libc = _libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    proc = psutil.Process()
    block = 64 * 1024  # below glibc's mmap threshold: from the heap
    blocks = [libc.malloc(block) for _ in range(4000)]  # 250 MiB
    for address in blocks:
        ctypes.memset(address, 1, block)
    kept = libc.malloc(block)  # above them all: the freed blocks cannot leave from the heap's top
    ctypes.memset(kept, 1, block)
    for address in blocks:
        libc.free(address)
    held = proc.memory_info().rss
    try:
        assert release_freed_memory()
        assert held - proc.memory_info().rss > 150 * 2**20
    finally:
        libc.free(kept)


def test_arrow_pool_pages_go_back_to_the_system():
    np = pytest.importorskip("numpy")
    pa = pytest.importorskip("pyarrow")
    proc = psutil.Process()
    pool = pa.default_memory_pool()
    buffers = [pa.allocate_buffer(4096, memory_pool=pool) for _ in range(50_000)]  # 195 MiB of small blocks
    for buffer in buffers:
        np.frombuffer(buffer, dtype=np.uint8)[:] = 1
    del buffers
    held = proc.memory_info().rss
    release_freed_memory()
    assert held - proc.memory_info().rss > 100 * 2**20, pool.backend_name


def test_each_stage_starts_by_releasing_what_earlier_ones_freed(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import vcn_assets.assets.recording as recording
    from vcn.stores.warehouse import Warehouse

    calls = []
    monkeypatch.setattr(recording, "release_freed_memory", lambda: calls.append("released"))
    context = SimpleNamespace(partition_key="m", run=SimpleNamespace(run_id="r"), log=SimpleNamespace(info=print))
    with recording.stage(context, Warehouse(str(tmp_path / "wh.duckdb")), "shots"):
        calls.append("body")
    assert calls == ["released", "body"]


@pytest.mark.skipif(_libc() is None, reason="the C library has no mallopt (not glibc)")
def test_large_blocks_stay_in_the_heap_inside_heap_reused_and_not_after():
    import resource

    from vcn.memory import heap_reused

    libc = _libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20  # above glibc's largest sliding mmap threshold (32 MiB): mapped on its own by default
    pages = size // 4096

    def faults_of_a_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        address = libc.malloc(size)
        ctypes.memset(address, 1, size)
        libc.free(address)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert faults_of_a_block() > pages // 2  # glibc's default: every block faulted in afresh
    with heap_reused() as tuned:
        assert tuned
        faults_of_a_block()  # the heap grows once
        again = [faults_of_a_block() for _ in range(3)]  # and its pages serve the next blocks
        held = psutil.Process().memory_info().rss
    assert max(again) < pages // 10
    # Leaving handed the kept heap back, and blocks are mapped afresh again.
    assert held - psutil.Process().memory_info().rss > size // 2
    assert faults_of_a_block() > pages // 2
