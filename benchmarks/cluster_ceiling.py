"""How well can *any* clustering of these embeddings do? Oracle-informed bounds on a track dataset.

The clustering target of the self-supervision work (WCP >= 95 at a PCR of
0.9-1.25 on the development episode) presumes embeddings in which a person's
tracks sit together. This script measures how far the embeddings the product
has are from that, with help no real run gets:

- **1-NN identity**: the fraction of tracks whose nearest other track (cosine
  between unit track means) is the same person; and the same when tracks
  rendered from the same source photo are left out (the development episode
  reuses photos across a main character's tracks; a different photo of the
  person is the hard, honest case). Needs ``_meta/render.csv``.
- **Clusterings told the true number of people** k (and 1.2 k, the top of the
  target's PCR band): spectral clustering on a k-nearest-neighbour graph, k-means,
  Ward, complete and average linkage (scikit-learn), on the pretrained and the
  finetuned track means. Each reports WCP at exactly that many clusters, so its
  PCR is 1.0 (or 1.2); the best of them bounds what a parameter-free method on
  these embeddings can expect.

Reads the arrays that ``benchmarks/cluster_quality.py --dump FILE`` saved (crop
embeddings of the pretrained and the finetuned model, crop tracks, labels).
Writes ``benchmarks/results/cluster_ceiling.json`` and ``.md``.

Usage::

    python benchmarks/cluster_quality.py --dump benchmarks/work/devep_dump.npz   # ~15 min
    python benchmarks/cluster_ceiling.py benchmarks/work/devep_dump.npz
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_TRACKSET = ROOT.parent / "shared" / "data" / "tracksets" / "dev-ep"


def unit_track_means(embeddings: np.ndarray, crop_track: np.ndarray, n_tracks: int) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    means = np.zeros((n_tracks, unit.shape[1]))
    np.add.at(means, crop_track, unit)
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def wcp(predicted: np.ndarray, labels: np.ndarray) -> float:
    return sum(Counter(labels[predicted == c]).most_common(1)[0][1] for c in np.unique(predicted)) / len(labels)


def nearest_neighbour_identity(means: np.ndarray, labels: np.ndarray, sources: np.ndarray | None) -> dict:
    similarity = means @ means.T
    np.fill_diagonal(similarity, -np.inf)
    out = {"any_track": float((labels[similarity.argmax(1)] == labels).mean())}
    if sources is not None:
        same_photo = sources[:, None] == sources[None, :]
        out["nearest_is_same_photo"] = float(same_photo[np.arange(len(labels)), similarity.argmax(1)].mean())
        similarity[same_photo] = -np.inf
        has_other = np.isfinite(similarity).any(1)
        nearest = similarity.argmax(1)
        out["other_photos_only"] = float((labels[nearest] == labels)[has_other].mean())
    return out


def oracle_clusterings(means: np.ndarray, labels: np.ndarray, k: int, seed: int = 0) -> dict[str, float]:
    from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering

    runs = {
        "spectral, 10-NN graph": lambda: SpectralClustering(
            k, affinity="nearest_neighbors", n_neighbors=10, random_state=seed).fit_predict(means),
        "k-means": lambda: KMeans(k, n_init=10, random_state=seed).fit_predict(means),
        "Ward": lambda: AgglomerativeClustering(k, linkage="ward").fit_predict(means),
        "complete linkage": lambda: AgglomerativeClustering(k, linkage="complete", metric="cosine").fit_predict(means),
        "average linkage": lambda: AgglomerativeClustering(k, linkage="average", metric="cosine").fit_predict(means),
    }
    return {name: round(100 * wcp(run(), labels), 2) for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", type=Path, help="the .npz that cluster_quality.py --dump wrote")
    parser.add_argument("--trackset", type=Path, default=DEFAULT_TRACKSET,
                        help="the dataset the dump came from (for _meta/render.csv); default dev-ep")
    args = parser.parse_args()
    data = np.load(args.dump)
    labels, crop_track = data["labels"], data["crop_track"]
    n_tracks = len(labels)
    render = args.trackset / "_meta" / "render.csv"
    sources = None
    if render.is_file():
        rows = sorted(csv.DictReader(render.open()), key=lambda row: row["track_id"])
        # The dump holds tracks in track-id order; use the photos only if the identities line up.
        if [row["identity"] for row in rows] == labels.tolist():
            sources = np.array([row["source"] for row in rows])
    k = len(set(labels.tolist()))
    report = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dump": str(args.dump),
        "tracks": n_tracks,
        "people": k,
        "distinct_photos": None if sources is None else len(set(sources.tolist())),
        "models": {},
    }
    for model in ("pretrained", "finetuned"):
        if model not in data.files:
            continue
        means = unit_track_means(data[model], crop_track, n_tracks)
        report["models"][model] = {
            "nearest_neighbour": nearest_neighbour_identity(means, labels, sources),
            "at_k": oracle_clusterings(means, labels, k),
            "at_1.2k": oracle_clusterings(means, labels, round(1.2 * k)),
        }
        print(model, report["models"][model], flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    (RESULTS / "cluster_ceiling.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "cluster_ceiling.md").write_text(_markdown(report))


def _markdown(report: dict) -> str:
    lines = [
        "# What any clustering of these embeddings can reach (oracle-informed)",
        "",
        f"Measured {report['measured']} by `benchmarks/cluster_ceiling.py` on `{report['dump']}`: "
        f"{report['tracks']} tracks, {report['people']} people"
        + (f", {report['distinct_photos']} distinct source photos" if report["distinct_photos"] else "")
        + ". Track = unit mean of its crops' unit embeddings. Every row below is told the ground truth "
        "(the number of people, or the labels for 1-NN); none is a method a real run could use.",
        "",
        "| model | 1-NN same person % | 1-NN is the same photo % | 1-NN same person, other photos only % |",
        "|---|---|---|---|",
    ]
    for model, m in report["models"].items():
        nn = m["nearest_neighbour"]
        lines.append(
            f"| {model} | {100 * nn['any_track']:.1f} | "
            f"{100 * nn['nearest_is_same_photo']:.1f} | {100 * nn['other_photos_only']:.1f} |"
            if "other_photos_only" in nn else f"| {model} | {100 * nn['any_track']:.1f} | - | - |"
        )
    lines += ["", "WCP % of clusterings told the number of clusters (PCR 1.0 at k, 1.2 at 1.2 k):", ""]
    names = list(next(iter(report["models"].values()))["at_k"])
    lines.append("| model | clusters | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for model, m in report["models"].items():
        for key, label in (("at_k", "k"), ("at_1.2k", "1.2 k")):
            lines.append(f"| {model} | {label} | " + " | ".join(f"{m[key][n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
