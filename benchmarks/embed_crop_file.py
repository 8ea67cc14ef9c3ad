"""Embedding a movie's crop file on the CPU: memory chunk by chunk, per Parquet reader.

Runs :func:`vcn.pipeline.embed` over the kept crops of a ``track_crops`` file
as ``track_embeddings`` does (a :class:`vcn.pipeline.CropFile`, SER-FIQ quality,
SFace, the default backbone), once with each way of reading the file, each in a fresh
process: ``row group`` (the product: :func:`vcn.stores.files.parquet_batches`,
one reader per row group) and ``whole file`` (one ``ParquetFile.iter_batches``
over the whole file, how every reader of the crops worked before). After each
chunk of :data:`vcn.pipeline.CHUNK_SIZE` crops: RSS right after the chunk (the
heap just trimmed), the peak RSS within the chunk (sampled every 50 ms), the C
heap's resident MB, and the bytes Arrow's memory pool holds. A length-bound
growth shows as a rising column over the chunks.

A crop file comes from a processed movie: ``track_crops.parquet`` and
``face_tracks.parquet`` under ``<artifact root>/movies/<movie id>/`` (e.g. of
``benchmarks/work/movie_120min.mp4``, whose files are at least 175 row groups).

    python benchmarks/embed_crop_file.py --crops .../track_crops.parquet --tracks .../face_tracks.parquet \
        [--row-groups 24]

Writes ``benchmarks/results/embed_crop_file.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The ways of reading the crop file, product first.
READERS = ["row group", "whole file"]


def _heap_mb() -> float:
    """Resident MB of the process's C heap (``[heap]`` in smaps)."""
    total, in_heap = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                in_heap = line.rstrip().endswith("[heap]")
            elif in_heap and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total / 1024


def measure(crops: str, tracks: str, reader: str) -> dict:
    """One reader, in this process."""
    import threading
    import time

    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    import vcn.identity.embeddings as embeddings
    from vcn import load_backbone
    from vcn.pipeline import CropFile, embed

    if reader == "whole file":
        def whole_file(path, batch_size, columns=None):
            yield from pq.ParquetFile(str(path)).iter_batches(batch_size=batch_size, columns=columns)

        embeddings.parquet_batches = whole_file
    page = os.sysconf("SC_PAGE_SIZE")

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20

    peak = [0.0]
    running = True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    model = load_backbone("sface", device="cpu")
    track_ids = pl.read_parquet(tracks, columns=["track_id"])["track_id"].drop_nulls().unique().sort().to_numpy()
    source = CropFile.open(crops, model.template, track_ids)
    pool = pa.default_memory_pool()
    chunks = []

    def progress(done: int, total: int) -> None:
        chunks.append({
            "crops": done,
            "rss_after_mb": round(rss_mb()),
            "peak_in_chunk_mb": round(peak[0]),
            "heap_mb": round(_heap_mb()),
            "arrow_mb": round(pool.bytes_allocated() / 2**20, 1),
        })
        peak[0] = 0.0

    started = time.perf_counter()
    embed(model, source, progress=progress)
    seconds = time.perf_counter() - started
    running = False
    return {
        "reader": reader, "crops": len(source.crop_track), "seconds": round(seconds, 1),
        "crops_per_s": round(len(source.crop_track) / seconds, 1), "chunks": chunks,
    }


def first_row_groups(crops: str, n: int, out: Path) -> str:
    """The first ``n`` row groups of ``crops`` as a file of their own (the whole file when it has no more)."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(crops)
    if n <= 0 or n >= source.num_row_groups:
        return crops
    with pq.ParquetWriter(str(out), source.schema_arrow, compression="zstd") as writer:
        for group in range(n):
            writer.write_table(source.read_row_group(group))
    return str(out)


def render(result: dict) -> str:
    runs = result["runs"]
    lines = [
        "# Embedding a movie's crop file on the CPU: memory chunk by chunk, per Parquet reader",
        "",
        f"`benchmarks/embed_crop_file.py`, measured {result['measured_at']} on {result['machine']}; "
        f"{result['source']}, its first {result['row_groups']} row groups ({runs[0]['crops']:,} kept crops); "
        "backbone `sface`, `vcn.pipeline.embed` with SER-FIQ quality as `track_embeddings` runs it, each reader "
        "in a fresh process. row group: `vcn.stores.files.parquet_batches` (the product); whole file: one "
        "`ParquetFile.iter_batches` over the file (before). Per chunk of 512 crops: RSS right after it (heap "
        "trimmed), peak RSS within it (50-ms samples), the C heap's resident MB, Arrow's pool MB.",
        "",
        "| reader | crops/s | RSS after the first chunk -> after the last | peak within a chunk: first -> most | "
        "Arrow MB: first -> last | Arrow MB a thousand crops |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        c = run["chunks"]
        full = [x for x in c if x["crops"] % 512 == 0] or c
        growth = (full[-1]["arrow_mb"] - full[0]["arrow_mb"]) / max(1, (full[-1]["crops"] - full[0]["crops"]) / 1000)
        lines.append(
            f"| {run['reader']} | {run['crops_per_s']} | {full[0]['rss_after_mb']:,} -> {full[-1]['rss_after_mb']:,} | "
            f"{c[0]['peak_in_chunk_mb']:,} -> {max(x['peak_in_chunk_mb'] for x in c):,} | "
            f"{full[0]['arrow_mb']} -> {full[-1]['arrow_mb']} | {growth:.2f} |"
        )
    lines += ["", "Per chunk (crops done: RSS after / peak within / C heap / Arrow, MB):", ""]
    for run in runs:
        cells = [f"{x['crops']}: {x['rss_after_mb']}/{x['peak_in_chunk_mb']}/{x['heap_mb']}/{x['arrow_mb']}"
                 for x in run["chunks"]]
        lines.append(f"- {run['reader']}: " + ", ".join(cells))
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", required=True, help="a movie's track_crops.parquet")
    parser.add_argument("--tracks", required=True, help="the same movie's face_tracks.parquet")
    parser.add_argument("--row-groups", type=int, default=24, help="embed the first N row groups (0: all)")
    parser.add_argument("--source", default="a movie's crops", help="what the crop file is, for the results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.crops, args.tracks, args.one)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        crops = first_row_groups(args.crops, args.row_groups, Path(tmp) / "crops.parquet")
        runs = []
        for reader in READERS:
            out = subprocess.run(
                [sys.executable, __file__, "--crops", crops, "--tracks", args.tracks, "--one", reader],
                check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1]["reader"], runs[-1]["crops_per_s"], file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    from benchmarks.cluster_rules import write_results

    write_results("embed_crop_file", {"source": args.source, "row_groups": args.row_groups, "runs": runs}, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
