"""Memory and time of the clustering against the number of tracks.

A feature film has thousands of tracks (a 2-hour movie of our test footage:
about 16,000). Both clustering rules compare every cluster with every other;
held whole, a clusters-by-clusters float32 matrix is 1 GiB at 16,000 tracks.

- The product's rule, average linkage cut at the movie's own different-person
  distances (``vcn.clustering.linkage.cluster_by_negative_cut``), holds each
  cluster as its mean factors and finds the merges by the nearest-neighbour
  chain, so it never holds a (T, T) matrix (``negative-cut`` rows).
- The paper's adaptive thresholds, the fallback (``cluster_tracks``), work on
  blocks of rows (``vcn.clustering.parameter_free.BLOCK_BYTES``, 32 MiB of
  float32): ``adaptive, blocks`` rows, against ``adaptive, whole matrix`` (one
  block of every row, what that code did before); the two must agree.

Each run is a child process of its own and reports the process's peak RSS, the
wall time and the clusters found, then the peak of numpy's allocations inside
the same call made again under tracemalloc (which slows it; the embeddings it is
given are not counted). The tracks are synthetic: 128-d unit embeddings, 8 crops a track, one
person per 40 tracks, with the spread of a real episode (people overlap), and
cannot-link between random pairs of tracks.

Results go to ``benchmarks/results/cluster_memory.json`` and ``.md``.

Usage::

    python benchmarks/cluster_memory.py                      # 2,000 to 16,000 tracks
    python benchmarks/cluster_memory.py --tracks 1000 4000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_movie(n_tracks: int, seed: int = 0, crops: int = 8, dim: int = 128):
    import numpy as np

    rng = np.random.default_rng(seed)
    people = max(2, n_tracks // 40)
    centres = rng.normal(size=(people, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    person = rng.integers(people, size=n_tracks)
    tracks = centres[person] + rng.normal(scale=0.03, size=(n_tracks, dim))
    crop_track = np.repeat(np.arange(n_tracks), crops)
    x = tracks[crop_track] + rng.normal(scale=0.06, size=(len(crop_track), dim))
    cannot = rng.integers(n_tracks, size=(n_tracks // 2, 2))
    return x.astype(np.float32), crop_track, cannot


#: What each child runs: the product's rule, and the fallback with its whole matrix or in blocks.
MODES = ("negative-cut", "adaptive, whole matrix", "adaptive, blocks")


def child(n_tracks: int, mode: str) -> dict:
    import tracemalloc

    from vcn.clustering.dissimilarity import CosineDissimilarity
    from vcn.clustering.linkage import cluster_by_negative_cut
    from vcn.clustering.parameter_free import cluster_tracks

    x, crop_track, cannot = synthetic_movie(n_tracks)
    cosine = CosineDissimilarity()
    factors = cosine.factors(x)
    def run():
        if mode == "negative-cut":
            return cluster_by_negative_cut(
                factors, crop_track, n_tracks, cannot_link=cannot, exclude=None, representatives=cosine.representative
            )
        return cluster_tracks(
            factors, crop_track, n_tracks, cannot_link=cannot, representatives=cosine.representative,
            block_rows=n_tracks if mode == "adaptive, whole matrix" else None,
        )

    # Timed and RSS-measured first; tracemalloc, which slows every allocation, on a second run.
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "tracks": n_tracks,
        "rule": mode,
        "peak_alloc_mb": round(peak / 2**20, 1),
        "peak_rss_mb": round(rss / 1024, 1),
        "seconds": round(seconds, 1),
        "clusters": result.n_clusters,
        "rounds": result.rounds,
        "labels_sha1": hashlib.sha1(result.labels.tobytes()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, nargs="+", default=[2000, 4000, 8000, 16000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    rows = []
    for n in args.tracks:
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), mode],
                check=True, capture_output=True, text=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(row, flush=True)
        whole, blocked = rows[-2], rows[-1]  # the fallback's two ways
        if whole["labels_sha1"] != blocked["labels_sha1"]:
            raise SystemExit(f"{n} tracks: the blocked rounds found other clusters than the whole matrix")
    report = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Clustering memory against the number of tracks",
        "",
        f"Measured {report['measured']} on {report['machine']} by `benchmarks/cluster_memory.py`: "
        "synthetic 128-d tracks of 8 crops, cosine, cannot-link on; peak of numpy's allocations inside "
        "the clustering call (tracemalloc, on a second run), the child process's peak RSS and the wall time of the first run. `negative-cut` is the product's "
        "rule (no tracks-by-tracks matrix); the paper's adaptive thresholds, the fallback, found the same clusters "
        "with the whole matrix and in blocks.",
        "",
        "| tracks | rule | peak alloc MB | peak RSS MB | seconds | clusters | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tracks']:,} | {r['rule']} | {r['peak_alloc_mb']} | {r['peak_rss_mb']} | "
            f"{r['seconds']} | {r['clusters']} | {r['rounds']} |"
        )
    (RESULTS / "cluster_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
