"""Where the negative cut sits against the people of an episode: person pairs below it, and the merges near it.

Reads the dumps of ``benchmarks/cluster_quality.py --dump`` and, for each embedding set in
them (pretrained, and finetuned when present), clusters with the product's default
(:func:`vcn.pipeline.cluster`: quality screen, cannot-link, negative cut) to get its cut, then
uses the labels to show what that cut does at the level of people:

- person pairs: the mean cosine distance between the tracks of two people (the distance
  average linkage merges two whole people at); how many pairs lie below the cut, how many
  of those ever share the screen (so cannot-link can refuse them), the closest pair, and
  the largest mean distance between tracks of one person;
- merges: average linkage run to the end on the same track points without constraints
  (scipy), each merge of two clusters of at least 3 tracks marked right (same majority
  person) or wrong; the height of the first wrong one, the wrong ones below the cut, and
  the right ones within 0.04 under it (what a lower cut would give up).

Usage::

    python benchmarks/cut_mechanism.py benchmarks/work/dumps/mv_sface_ft.npz benchmarks/work/dumps/ep_sface_ft.npz \
        benchmarks/work/dumps/bbt_sface_ft.npz benchmarks/work/dumps/buffymv_sface_ft.npz
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_rules import dump_sets, write_results  # noqa: E402
from vcn.clustering.dissimilarity import CosineDissimilarity  # noqa: E402
from vcn.clustering.linkage import track_points  # noqa: E402
from vcn.pipeline import Embedded, cluster  # noqa: E402

#: Merges of two clusters with at least this many tracks each count as merging people (or parts of one).
MERGE_SIZE = 3
#: The band under the cut whose right merges a lower cut would give up.
BAND = 0.04


def person_pairs(distances: np.ndarray, labels: np.ndarray, cannot_link: np.ndarray, cut: float) -> dict:
    """What the cut does to whole people: mean distances between and within people (labels)."""
    people = sorted(set(labels.tolist()))
    tracks = {p: np.flatnonzero(labels == p) for p in people}
    together = {frozenset((labels[a], labels[b])) for a, b in cannot_link if labels[a] != labels[b]}
    between = []
    for i, a in enumerate(people):
        for b in people[i + 1 :]:
            between.append((float(distances[np.ix_(tracks[a], tracks[b])].mean()), frozenset((a, b)) in together))
    within = [distances[np.ix_(t, t)][np.triu_indices(len(t), 1)].mean() for t in tracks.values() if len(t) > 1]
    below = [seen for d, seen in between if d < cut]
    return {
        "person_pairs": len(between), "below_cut": len(below), "below_cut_on_screen_together": int(sum(below)),
        "closest_pair": round(min(d for d, _ in between), 4), "widest_person": round(float(max(within)), 4),
    }


def _majority(members: list) -> str:
    """The most frequent label; a tie goes to the first in sorted order (the same in every run)."""
    return Counter(sorted(members)).most_common(1)[0][0]


def merges(points: np.ndarray, labels: np.ndarray, cut: float) -> dict:
    """Unconstrained average linkage on unit track directions: the merges of clusters of MERGE_SIZE+ tracks."""
    from scipy.cluster.hierarchy import linkage

    tree = linkage(points, method="average", metric="cosine")
    n = len(points)
    members: dict[int, list] = {i: [labels[i]] for i in range(n)}
    heights, right = [], []
    for k, (a, b, height, _) in enumerate(tree):
        left, other = members.pop(int(a)), members.pop(int(b))
        if min(len(left), len(other)) >= MERGE_SIZE:
            heights.append(height)
            right.append(_majority(left) == _majority(other))
        members[n + k] = left + other
    heights, right = np.array(heights), np.array(right, dtype=bool)
    wrong = heights[~right]
    return {
        "first_wrong_merge": round(float(wrong.min()), 4) if len(wrong) else None,
        "wrong_merges_below_cut": int((wrong < cut).sum()),
        "right_merges_in_band_under_cut": int((right & (heights >= cut - BAND) & (heights < cut)).sum()),
    }


def evaluate(path: Path) -> list[dict]:
    data = np.load(path)
    crop_track, labels, pairs = data["crop_track"], data["labels"], data["cannot_link"]
    n = len(labels)
    rows = []
    for key, quality in dump_sets(data):
        result = cluster(Embedded(crop_track, data[key], data[quality], key), n, similarity="cosine",
                         cannot_link=pairs, quality_screen=True)
        cut = float(result.clustering.cut)
        cosine = CosineDissimilarity()
        tracks = np.arange(n)
        points = track_points(cosine.factors(data[key]), crop_track, tracks, cosine.representative)
        distances = points.between(tracks, tracks).astype(np.float64)
        row = {"dump": path.stem, "embeddings": key, "cut": round(cut, 4), "clusters": result.n_clusters,
               "people": len(set(labels.tolist())), **person_pairs(distances, labels, pairs, cut),
               **merges(points.u.astype(np.float64), labels, cut)}
        print(row, flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# The negative cut against the people of each episode",
        "",
        f"`benchmarks/cut_mechanism.py`, measured {result['measured_at']} on {result['machine']}, on the dumps of "
        "`benchmarks/cluster_quality.py --dump`. Cut: the product's default clustering's (quality screen, "
        "cannot-link, lower quartile of the on-screen-together distances). Person pairs: mean cosine distance "
        "between the tracks of two people (labels); 'below cut' of all pairs, and of those the pairs that share "
        "the screen somewhere (cannot-link can refuse them). Widest person: the largest mean distance between "
        f"tracks of one person. Merges: average linkage without constraints, merges of two clusters of at least "
        f"{MERGE_SIZE} tracks, wrong when their majority people differ; right merges within {BAND} under the cut "
        "are what a lower cut would give up.",
        "",
        "| dump | embeddings | people | clusters | cut | person pairs below cut | of them on screen together | "
        "closest pair | widest person | first wrong merge | wrong merges below cut | right merges within band |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['dump']} | {r['embeddings']} | {r['people']} | {r['clusters']} | {r['cut']} | "
            f"{r['below_cut']} of {r['person_pairs']} | {r['below_cut_on_screen_together']} | {r['closest_pair']} | "
            f"{r['widest_person']} | {r['first_wrong_merge']} | {r['wrong_merges_below_cut']} | "
            f"{r['right_merges_in_band_under_cut']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dumps", nargs="+", type=Path, help="files from cluster_quality.py --dump")
    parser.add_argument("--name", default="cut_mechanism", help="stem of the results files")
    args = parser.parse_args(argv)
    write_results(args.name, {"dumps": [p.name for p in args.dumps],
                              "rows": [row for path in args.dumps for row in evaluate(path)]}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
