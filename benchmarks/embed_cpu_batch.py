"""Embedding on the CPU: chips per forward pass, and the C heap kept across batches.

Each configuration runs in a fresh process (so its peak RSS is its own) and
embeds the same seeded chips with the default backbone: with SER-FIQ quality
(:func:`vcn.identity.quality.embed_and_score`, what ``track_embeddings`` runs)
and without (``Backbone.embed``). Per configuration: crops/s, the process's user
and kernel CPU seconds, minor page faults per chip, peak RSS, and whether the
embeddings and qualities equal those of the first configuration. The chips are
seeded random pixels: the network's cost does not depend on what they show.

The last row runs the product's own :func:`vcn.pipeline.embed` (its CPU batch
and heap setting).

    python benchmarks/embed_cpu_batch.py [--chips 512] [--backbone sface]

Writes ``benchmarks/results/embed_cpu_batch.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (path, chips per pass, heap kept across batches). The first is what track_embeddings ran before.
CONFIGS = [
    ("quality", 128, False),
    ("quality", 128, True),
    ("quality", 32, True),
    ("quality", 16, False),
    ("quality", 16, True),
    ("quality", 8, True),
    ("embed", 256, False),
    ("embed", 16, True),
    ("pipeline", 0, True),
]


def measure(path: str, batch: int, reuse: bool, n: int, backbone_name: str) -> dict:
    """One configuration, in this process."""
    import hashlib
    import resource
    import time

    import numpy as np

    from vcn.identity.backbone import load_backbone
    from vcn.identity.quality import embed_and_score
    from vcn.memory import heap_reused
    from vcn.pipeline import embed

    backbone = load_backbone(backbone_name, device="cpu")
    chips = np.random.default_rng(0).integers(0, 256, (n, backbone.input_size, backbone.input_size, 3), np.uint8)

    class Source:
        crop_track = np.zeros(n, np.int64)

        def chunks(self, size):
            for first in range(0, n, size):
                yield chips[first : first + size]

    def run(part):
        if path == "pipeline":
            out = embed(backbone, Source())
            return out.embeddings, out.quality
        context = heap_reused() if reuse else contextlib.nullcontext()
        with context:
            if path == "quality":
                return embed_and_score(backbone, part, batch_size=batch)
            return backbone.embed(part, batch_size=batch), np.zeros(0, np.float32)

    if path != "pipeline":
        run(chips[: min(batch, n)])  # warm-up: one batch
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    embeddings, quality = run(chips)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256(np.ascontiguousarray(embeddings).tobytes() + np.ascontiguousarray(quality).tobytes())
    return {
        "path": path,
        "batch": batch,
        "heap_reused": reuse,
        "chips": n,
        "crops_per_s": round(n / seconds, 2),
        "user_s": round(after.ru_utime - before.ru_utime, 1),
        "kernel_s": round(after.ru_stime - before.ru_stime, 1),
        "minor_faults_per_chip": round((after.ru_minflt - before.ru_minflt) / n),
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        "digest": digest.hexdigest()[:16],
        "embeddings_only_digest": hashlib.sha256(np.ascontiguousarray(embeddings).tobytes()).hexdigest()[:16],
    }


def render(result: dict) -> str:
    lines = [
        "# Embedding on the CPU: chips per forward pass and the heap kept across batches",
        "",
        f"`benchmarks/embed_cpu_batch.py`, measured {result['measured_at']} on {result['machine']}; backbone "
        f"`{result['backbone']}`, {result['chips']} seeded chips per configuration, each in a fresh process. "
        "quality: embeddings and SER-FIQ quality in one trunk pass (what `track_embeddings` runs); embed: "
        "embeddings alone; pipeline: `vcn.pipeline.embed` as the product runs it. Same output: the embeddings "
        "(and qualities) equal those of the first row of the same kind, bit for bit.",
        "",
        "| path | chips per pass | heap kept | crops/s | user s | kernel s | minor faults per chip | peak RSS MB | same output |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first: dict[str, str] = {}
    for row in result["rows"]:
        kind = "embed" if row["path"] == "embed" else "quality"
        key = "embeddings_only_digest" if kind == "embed" else "digest"
        first.setdefault(kind, row[key])
        lines.append(
            f"| {row['path']} | {row['batch'] or 'product'} | {'yes' if row['heap_reused'] else 'no'} | {row['crops_per_s']} | "
            f"{row['user_s']} | {row['kernel_s']} | {row['minor_faults_per_chip']:,} | {row['peak_rss_mb']:,} | "
            f"{'yes' if row[key] == first[kind] else 'NO'} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=512)
    parser.add_argument("--backbone", default="sface")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, batch, reuse = json.loads(args.one)
        print(json.dumps(measure(path, batch, reuse, args.chips, args.backbone)))
        return 0
    rows = []
    for path, batch, reuse in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--chips", str(args.chips), "--backbone", args.backbone,
             "--one", json.dumps([path, batch, reuse])],
            check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    from benchmarks.cluster_rules import write_results

    write_results("embed_cpu_batch", {"backbone": args.backbone, "chips": args.chips, "rows": rows}, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
