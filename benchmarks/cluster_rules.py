"""The two clustering rules side by side on saved embeddings, and the negative cut's quantile swept.

Reads the ``.npz`` files that ``benchmarks/cluster_quality.py --dump`` saves (crop
embeddings of the pretrained and, when it finetuned, the adapted model, crop
qualities, tracks on screen together, labels) and clusters them with:

- the paper's adaptive per-cluster thresholds (``vcn.clustering.parameter_free.cluster_tracks``);
- average linkage cut at the movie's own different-person distances
  (``vcn.clustering.linkage``) at its quantile, and swept over other quantiles to show
  where the quantile sits on the curve.

Both with the quality screen and cannot-link, as the product runs them. Labels are
read only to score. Also prints how the distances of tracks on screen together
compare with those of all different-person pairs (the mechanism the cut relies on).

Usage::

    python benchmarks/cluster_quality.py --dump benchmarks/work/dumps/ep_dlib.npz ...
    python benchmarks/cluster_rules.py benchmarks/work/dumps/*.npz --name cluster_rules \
        --pair benchmarks/work/dumps/ep_dlib.npz benchmarks/work/dumps/ep_sface.npz   # two models concatenated
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcn.clustering.dissimilarity import CosineDissimilarity
from vcn.clustering.linkage import (
    GROUP_QUANTILE,
    GROUP_SIZE,
    NEGATIVE_QUANTILE,
    average_linkage,
    cluster_by_negative_cut,
    pair_distances,
    track_points,
)
from vcn.clustering.metrics import evaluate
from vcn.clustering.parameter_free import UNKNOWN, cluster_tracks
from vcn.identity.quality import low_quality_tracks, track_quality

RESULTS = ROOT / "benchmarks" / "results"
SWEEP = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
#: The product's rule as the rows name it.
RULE = f"negative cut q{NEGATIVE_QUANTILE}, group cut q{GROUP_QUANTILE} ({GROUP_SIZE}+ tracks)"


#: The embedding sets a dump of ``cluster_quality.py --dump`` may hold: (embeddings key, crop quality key).
DUMP_SETS = (("pretrained", "quality"), ("finetuned", "finetuned_quality"))


def dump_sets(data) -> list[tuple[str, str]]:
    """The :data:`DUMP_SETS` that ``data`` (a loaded dump) holds."""
    return [(key, quality) for key, quality in DUMP_SETS if key in data]


def _scores(labels: np.ndarray, assignment: np.ndarray) -> dict:
    truth = {str(i): name for i, name in enumerate(labels) if name}
    predicted = {str(i): (None if a == UNKNOWN else str(int(a))) for i, a in enumerate(assignment)}
    s = evaluate(truth, predicted).to_dict()
    return {"wcp": round(s["wcp"] * 100, 2), "pcr": round(s["pcr"], 3), "bcubed_f": round(s["bcubed_f"] * 100, 2),
            "nmi": round(s["nmi"] * 100, 2), "unknown": round(s["unknown_fraction"] * 100, 1)}


def evaluate_dump(path: Path) -> list[dict]:
    return _evaluate(np.load(path), path.stem)


def evaluate_pair(first: Path, second: Path) -> list[dict]:
    """The two dumps' pretrained embeddings of the same crops, each unit-length, concatenated and renormalised;
    the crops' quality is the second's (SFace's, which the default backbone gives)."""
    a, b = np.load(first), np.load(second)
    if not np.array_equal(a["crop_track"], b["crop_track"]):
        raise ValueError(f"{first} and {second} do not hold the same crops")
    halves = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a["pretrained"], b["pretrained"])]
    data = {key: b[key] for key in ("labels", "crop_track", "cannot_link", "quality")}
    data["pretrained"] = np.hstack(halves) / np.sqrt(2.0)
    return _evaluate(data, f"{first.stem}+{second.stem}")


def _evaluate(data, stem: str) -> list[dict]:
    labels, crop_track, pairs = data["labels"], data["crop_track"], data["cannot_link"]
    n = len(labels)
    cosine = CosineDissimilarity()
    rows = []
    for key, quality_key in dump_sets(data):
        factors = cosine.factors(data[key])
        low, _ = low_quality_tracks(track_quality(data[quality_key], crop_track, n))
        base = {"dump": stem, "embeddings": key}
        old = cluster_tracks(factors, crop_track, n, cannot_link=pairs, exclude=low,
                             representatives=cosine.representative)
        rows.append({**base, "rule": "adaptive thresholds (paper)", **_scores(labels, old.labels)})
        new = cluster_by_negative_cut(factors, crop_track, n, cannot_link=pairs, exclude=None, attach=low,
                                      representatives=cosine.representative)
        rows.append({**base, "rule": RULE, "cut": round(new.cut, 4),
                     "attached": new.attached, **_scores(labels, new.labels)})
        left_out = cluster_by_negative_cut(factors, crop_track, n, cannot_link=pairs, exclude=low,
                                           representatives=cosine.representative)
        rows.append({**base, "rule": f"{RULE}, low-quality tracks left Unknown",
                     "cut": round(left_out.cut, 4), **_scores(labels, left_out.labels)})
        unscreened = cluster_by_negative_cut(factors, crop_track, n, cannot_link=pairs, exclude=None,
                                             representatives=cosine.representative)
        rows.append({**base, "rule": f"{RULE}, no quality screen",
                     "cut": round(unscreened.cut, 4), **_scores(labels, unscreened.labels)})
        kept = np.flatnonzero(~low & (np.bincount(crop_track, minlength=n) > 0))
        points = track_points(factors, crop_track, kept, cosine.representative)
        position = np.full(n, -1)
        position[kept] = np.arange(len(kept))
        local = position[pairs]
        local = local[(local >= 0).all(axis=1)]
        negatives = pair_distances(points, local)
        names = labels[kept]
        upper = np.triu_indices(len(kept), 1)
        different = points.between(np.arange(len(kept)), np.arange(len(kept)))[upper]
        different = different[(names[upper[0]] != names[upper[1]]) & (names[upper[0]] != "")]
        rows[-1]["negatives_vs_different_q05_q25_q50"] = [
            [round(float(np.quantile(negatives, q)), 4) for q in (0.05, 0.25, 0.5)],
            [round(float(np.quantile(different, q)), 4) for q in (0.05, 0.25, 0.5)],
        ]
        for q in SWEEP:
            cut = float(np.quantile(negatives, q))
            assignment = np.full(n, UNKNOWN)
            assignment[kept] = average_linkage(points, cut, cannot_link=local)
            rows.append({**base, "rule": f"sweep q{q} (no group cut)", "cut": round(cut, 4),
                         **_scores(labels, assignment)})
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Clustering rules on saved embeddings",
        "",
        (
            f"`benchmarks/cluster_rules.py`, measured {result['measured_at']} on {result['machine']}. Quality screen "
            "and cannot-link on in every row but those that say otherwise. The product's rule is `negative cut`: "
            "low-quality tracks stay out of the linkage and the cut, then join the cluster they are within the cut "
            "of (`attached` counts them), or stay Unknown. WCP % / PCR / BCubed F % / NMI % / Unknown %."
        ),
        "",
        "| dump | embeddings | rule | cut | attached | WCP | PCR | BCubed F | NMI | Unknown |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['dump']} | {r['embeddings']} | {r['rule']} | {r.get('cut', '-')} | "
                     f"{r.get('attached', '-')} | {r['wcp']} | {r['pcr']} | {r['bcubed_f']} | {r['nmi']} | "
                     f"{r['unknown']} |")
    lines += ["", "Distances of tracks on screen together against all different-person pairs (quantiles 5/25/50 %):", ""]
    for r in result["rows"]:
        if "negatives_vs_different_q05_q25_q50" in r:
            neg, diff = r["negatives_vs_different_q05_q25_q50"]
            lines.append(f"- {r['dump']}, {r['embeddings']}: on screen together {neg}, all different people {diff}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dumps", nargs="+", type=Path, help="files from cluster_quality.py --dump")
    parser.add_argument("--name", default="cluster_rules", help="stem of the results files")
    parser.add_argument("--pair", nargs=2, type=Path, action="append", default=[], metavar=("FIRST", "SECOND"),
                        help="also two dumps of the same crops by two models, concatenated (repeatable)")
    args = parser.parse_args(argv)
    rows = [row for path in args.dumps for row in evaluate_dump(path)]
    rows += [row for first, second in args.pair for row in evaluate_pair(first, second)]
    dumps = [p.name for p in args.dumps] + [f"{a.name}+{b.name}" for a, b in args.pair]
    write_results(args.name, {"dumps": dumps, "rows": rows}, markdown)
    return 0


def write_results(name: str, result: dict, render) -> None:
    """``result`` with when and where it was measured, as ``benchmarks/results/NAME.json`` and, rendered by
    ``render``, ``NAME.md`` (also printed)."""
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    raise SystemExit(main())
