"""The progressive rounds' track matching as an adaptation lever: matches found, and what round 2 then gives.

Between rounds, :func:`vcn.identity.selfsup.matching.match_tracks` matches tracks whose
Gaussians (in a ``pca_dim``-dimensional PCA basis) cover each other's means, and the
next round also trains on pairs across matched tracks. This runs the CPU-budget
finetuning of ``vcn cluster-tracks`` on a labelled episode with the matching in
``--pca-dim`` dimensions, then embeds every crop with the finetuned model and clusters
them with the default pipeline (cosine, quality screen, cannot-link, negative cut),
scored against the labels; it also reports the label-free check's verdict.
``--matches-only`` instead counts the matches (and their precision, labels used) on
the saved embeddings of ``cluster_quality.py --dump`` for several dimensions.

Usage::

    python benchmarks/adaptation_matching.py --trackset ../shared/data/tracksets/dev-mv --pca-dim 8
    python benchmarks/adaptation_matching.py --matches-only benchmarks/work/dumps/mv_sface_ft.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_rules import _scores  # noqa: E402
from vcn.identity.selfsup.matching import match_precision, match_tracks  # noqa: E402

#: Dimensions of the matching's PCA basis counted by ``--matches-only`` (32: the default).
DIMENSIONS = (32, 16, 8)


def count_matches(path: Path) -> list[dict]:
    data = np.load(path)
    crop_track, labels, pairs = data["crop_track"], data["labels"], data["cannot_link"]
    rows = []
    for key in (k for k in ("pretrained", "finetuned") if k in data.files):
        for dim in DIMENSIONS:
            found = match_tracks(data[key], crop_track, len(labels), cannot_link=pairs, pca_dim=dim)
            rows.append({"dump": path.stem, "embeddings": key, "pca_dim": dim, "matches": len(found.pairs),
                         "precision": round(match_precision(found.pairs, labels), 3) if len(found.pairs) else None})
            print(rows[-1], flush=True)
    return rows


def finetune_and_score(trackset: Path, pca_dim: int, backbone_name: str) -> dict:
    import vcn.identity.selfsup.finetune as finetune
    from vcn.cluster_tracks import align_trackset
    from vcn.clustering.cannot_link import on_screen_together
    from vcn.formats.trackset import read_trackset_labels
    from vcn.identity.backbone import load_backbone
    from vcn.pipeline import adapt, cluster, embed

    default_mode = finetune.compute_mode

    def mode(device: str, n_crops: int, seed: int = 0) -> finetune.ComputeMode:
        m = default_mode(device, n_crops, seed)
        return finetune.ComputeMode(m.name, m.config.model_copy(update={"pca_dim": pca_dim}),
                                    f"{m.description} (matching in {pca_dim} dimensions)")

    finetune.compute_mode = mode
    aligned = align_trackset(trackset, backbone=load_backbone(backbone_name, device="cpu"))
    truth = read_trackset_labels(trackset)
    labels = np.array([truth.get(t, "") for t in aligned.track_ids])
    n = len(labels)
    cannot_link = on_screen_together(aligned.tracks)
    started = time.perf_counter()
    model = adapt(aligned.backbone, aligned.chips, n, cannot_link=cannot_link, seed=0, cpu_anyway=True).model
    seconds = time.perf_counter() - started
    embedded = embed(model.backbone, aligned.chips)
    result = cluster(embedded, n, similarity="cosine", cannot_link=cannot_link, quality_screen=True)
    history = model.history
    return {"trackset": trackset.name, "pca_dim": pca_dim, "rounds": len(history.rounds), "stopped": history.stopped,
            "matches_per_round": [r.n_matches for r in history.rounds], "finetune_seconds": round(seconds, 1),
            "check": model.check.to_dict() if model.check else None, "steps_aside": model.steps_aside,
            "finetuned_cosine": _scores(labels, result.labels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trackset", type=Path)
    parser.add_argument("--pca-dim", type=int, default=8)
    parser.add_argument("--backbone", default="sface")
    parser.add_argument("--matches-only", nargs="*", type=Path, default=None, help="dumps of cluster_quality.py --dump")
    args = parser.parse_args(argv)
    if args.matches_only:
        for path in args.matches_only:
            count_matches(path)
        return 0
    if args.trackset is None:
        parser.error("--trackset is required unless --matches-only")
    print(finetune_and_score(args.trackset, args.pca_dim, args.backbone), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
