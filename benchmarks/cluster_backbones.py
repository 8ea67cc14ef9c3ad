"""Clustering quality per base model, pretrained: dlib's ResNet, SFace, and the two combined.

The question this answers is whether a combined backbone (each model's unit
embedding of the crop aligned for its own template, the halves concatenated and
renormalised) clusters better than either model alone; only then is it worth a
backbone of its own. Every row runs our clustering (quality screen + cannot-link,
cosine) on the same tracks of a labelled track dataset, with the pretrained models
(adaptation is measured per backbone by ``benchmarks/cluster_quality.py
--backbone NAME``). The combined row's crop quality is the geometric mean of the
two models' SER-FIQ qualities (each is a positive score on its own scale, and the
screen only compares tracks of one movie with each other).

Outputs ``benchmarks/results/cluster_backbones_<name>.json`` and ``.md``.

Usage, from the repository root::

    python benchmarks/cluster_backbones.py --trackset ../shared/data/tracksets/dev-mv --name dev_mv
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcn.cluster_tracks import align_trackset  # noqa: E402
from vcn.clustering.cannot_link import on_screen_together  # noqa: E402
from vcn.clustering.metrics import evaluate  # noqa: E402
from vcn.clustering.parameter_free import UNKNOWN  # noqa: E402
from vcn.formats.trackset import read_trackset_labels  # noqa: E402
from vcn.identity.backbone import load_backbone  # noqa: E402
from vcn.pipeline import Embedded, cluster, embed  # noqa: E402

DEFAULT_TRACKSET = ROOT.parent / "shared" / "data" / "tracksets" / "dev-ep"
RESULTS = ROOT / "benchmarks" / "results"
BACKBONES = ("dlib-resnet", "sface")


def combined(parts: list[Embedded]) -> Embedded:
    """The halves of each crop's embeddings side by side, renormalised; quality the geometric mean."""
    if any(not np.array_equal(p.crop_track, parts[0].crop_track) for p in parts):
        raise ValueError("the backbones' chips are not the same crops in the same order")
    stacked = np.concatenate([p.embeddings for p in parts], axis=1)
    stacked /= np.linalg.norm(stacked, axis=1, keepdims=True)
    quality = None
    if all(p.quality is not None for p in parts):
        quality = np.exp(np.mean([np.log(np.maximum(p.quality, 1e-12)) for p in parts], axis=0)).astype(np.float32)
    return Embedded(parts[0].crop_track, stacked.astype(np.float32), quality, "+".join(p.model_version for p in parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trackset", type=Path, default=DEFAULT_TRACKSET)
    parser.add_argument("--name", default="dev_ep", help="suffix of the results files")
    args = parser.parse_args(argv)
    labels = read_trackset_labels(args.trackset)

    parts, rows, problems, timings = [], [], None, {}
    for name in BACKBONES:
        started = time.perf_counter()
        aligned = align_trackset(args.trackset, backbone=load_backbone(name, device="cpu"))
        found = sorted((p.track_id, p.reason) for p in aligned.problems)
        if problems is not None and found != problems:
            raise ValueError(f"{name}: other track problems than {BACKBONES[0]}'s; the rows would not compare")
        problems = found
        parts.append(embed(aligned.backbone, aligned.chips))
        timings[name] = round(time.perf_counter() - started, 1)
        track_ids, n_tracks, pairs = aligned.track_ids, len(aligned.track_ids), on_screen_together(aligned.tracks)
        print(f"{name}: {len(aligned.chips.crop_track)} chips embedded in {timings[name]} s", flush=True)

    for name, embedded in (*zip(BACKBONES, parts), ("dlib-resnet+sface", combined(parts))):
        result = cluster(embedded, n_tracks, cannot_link=pairs)
        predicted = {t: (None if a == UNKNOWN else str(int(a))) for t, a in zip(track_ids, result.labels)}
        scores = evaluate(labels, predicted).to_dict()
        rows.append({"backbone": name, "model_version": embedded.model_version, **scores})
        print(f"{name:20s} WCP {scores['wcp'] * 100:6.2f}  PCR {scores['pcr']:.3f}  BCubed F {scores['bcubed_f'] * 100:6.2f}"
              f"  NMI {scores['nmi'] * 100:6.2f}  Unknown {scores['unknown_fraction'] * 100:5.1f}%", flush=True)

    report = {
        "trackset": args.trackset.name,
        "n_tracks": n_tracks,
        "n_crops": int(len(parts[0].crop_track)),
        "n_identities": len(set(labels.values())),
        "seconds_align_and_embed": timings,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    lines = [
        "# Clustering quality per pretrained base model",
        "",
        f"`benchmarks/cluster_backbones.py` on `{report['trackset']}`: {report['n_tracks']} tracks, {report['n_crops']} "
        f"crops, {report['n_identities']} identities; ours, quality screen + cannot-link, cosine, no adaptation. "
        f"Measured {report['measured_at']} on {report['machine']}; align + embed seconds {timings}.",
        "",
        "| backbone | WCP % | PCR | BCubed P % | BCubed R % | BCubed F % | NMI % | Unknown % |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['backbone']} | {r['wcp'] * 100:.2f} | {r['pcr']:.3f} | {r['bcubed_precision'] * 100:.2f} | "
          f"{r['bcubed_recall'] * 100:.2f} | {r['bcubed_f'] * 100:.2f} | {r['nmi'] * 100:.2f} | "
          f"{r['unknown_fraction'] * 100:.1f} |" for r in rows),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cluster_backbones_{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"cluster_backbones_{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
