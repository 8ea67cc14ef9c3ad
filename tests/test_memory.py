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


_LARGE_BLOCKS_PROBE = r"""
import ctypes, resource, psutil
from vcn.memory import _libc, heap_reused

libc = _libc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20  # above glibc's starting mmap threshold (128 KiB), below the ceiling heap_reused sets (32 MiB)
pages = size // 4096

def faults_of_a_block(size=size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    libc.free(address)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

first = faults_of_a_block()  # a fresh process: mapped on its own
with heap_reused() as tuned:
    assert tuned
    faults_of_a_block()  # the heap grows once
    again = [faults_of_a_block() for _ in range(3)]  # and its pages serve the next blocks
    # Above the ceiling (32 MiB) a block is mapped on its own every time: the heap keeps no hole that size.
    larger = min(faults_of_a_block(48 << 20) for _ in range(2))
    held = psutil.Process().memory_info().rss
released = held - psutil.Process().memory_info().rss
after = faults_of_a_block()  # the freed pages went back: faulted in afresh once
print(first, max(again), larger, released, after, pages)
"""


@pytest.mark.skipif(_libc() is None, reason="the C library has no mallopt (not glibc)")
def test_large_blocks_stay_in_the_heap_inside_heap_reused_and_not_after():
    # In a fresh interpreter: in a long process (the whole test suite) earlier tests move glibc's sliding threshold
    # and leave free holes in the heap, partly resident, that malloc serves the block from instead of mapping it
    # (a CI run counted 4,631 faults for 16,384 pages here, twice).
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LARGE_BLOCKS_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, again, larger, released, after, pages = map(int, done.stdout.split())
    assert first > pages // 2  # above the threshold: every block faulted in afresh
    assert again < pages // 10  # inside: the heap's pages serve the next blocks
    assert larger > (48 << 20) // 4096 // 2
    # Leaving handed the kept heap back.
    assert released > pages * 4096 // 2
    assert after > pages // 2


def _binary_parquet(path, groups: int, rows: int, size: int):
    np = pytest.importorskip("numpy")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary())])
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        for g in range(groups):
            images = [rng.bytes(size) for _ in range(rows)]  # incompressible, as JPEG is
            ids = pa.array(range(g * rows, (g + 1) * rows), pa.int64())
            writer.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}, schema=schema))
    return path


def test_parquet_batches_gives_every_row_in_order_within_row_groups(tmp_path):
    from vcn.stores.files import parquet_batches

    path = _binary_parquet(tmp_path / "rows.parquet", groups=5, rows=30, size=8)
    batches = list(parquet_batches(path, 8, ["id"]))
    assert [b.num_columns for b in batches] == [1] * len(batches)
    assert [i for b in batches for i in b.column("id").to_pylist()] == list(range(150))
    assert [b.num_rows for b in batches] == [8, 8, 8, 6] * 5  # no batch spans two row groups
    assert sum(b.num_rows for b in parquet_batches(path, 1000)) == 150


def test_reading_a_binary_column_in_batches_holds_one_row_group_not_the_column(tmp_path):
    # pyarrow's whole-file iter_batches keeps what it decoded of a binary column until the file
    # object goes (here it would hold most of the 20 MiB column by the end).
    pa = pytest.importorskip("pyarrow")
    from vcn.stores.files import parquet_batches

    rows, size = 32, 16 * 1024  # 512 KiB a row group
    path = _binary_parquet(tmp_path / "images.parquet", groups=40, rows=rows, size=size)
    pool = pa.default_memory_pool()
    before, most, seen = pool.bytes_allocated(), 0, 0
    for batch in parquet_batches(path, 16, ["id", "image"]):
        seen += batch.num_rows
        most = max(most, pool.bytes_allocated() - before)
    assert seen == 40 * rows
    assert most < 4 * rows * size, f"Arrow held {most / 2**20:.1f} MiB while reading"


def test_track_means_are_exact_over_blocks_and_nan_for_tracks_without_crops():
    import numpy as np

    from vcn.identity.embeddings import TRACK_MEAN_BLOCK, unit_track_means

    rng = np.random.default_rng(3)
    n_tracks = 50
    crop_track = rng.integers(0, n_tracks - 2, 2 * TRACK_MEAN_BLOCK + 17)  # the last two tracks have no crops
    embeddings = rng.standard_normal((len(crop_track), 16)).astype(np.float32)
    means = unit_track_means(embeddings, crop_track, n_tracks)

    assert means.dtype == np.float32 and means.shape == (n_tracks, 16)
    assert np.isnan(means[-2:]).all() and np.isfinite(means[:-2]).all()
    for track in (0, 7, n_tracks - 3):
        expected = embeddings[crop_track == track].astype(np.float64).sum(axis=0)
        np.testing.assert_allclose(means[track], expected / np.linalg.norm(expected), rtol=1e-6, atol=1e-7)


def test_track_means_make_no_float64_copy_of_the_crop_matrix():
    """A feature film's 78,756 x 128 crop matrix would be 80 MB again in float64; a block at a time is 8 MB."""
    import tracemalloc

    import numpy as np

    from vcn.identity.embeddings import TRACK_MEAN_BLOCK, unit_track_means

    rng = np.random.default_rng(4)
    embeddings = rng.standard_normal((8 * TRACK_MEAN_BLOCK, 128)).astype(np.float32)
    crop_track = np.sort(rng.integers(0, 100, len(embeddings)))
    tracemalloc.start()
    try:
        unit_track_means(embeddings, crop_track, 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole_copy = embeddings.size * 8
    assert peak < whole_copy / 4, f"{peak / 2**20:.1f} MiB at peak, a float64 copy is {whole_copy / 2**20:.1f} MiB"
