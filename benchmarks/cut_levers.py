"""The levers on the negative cut, each moved alone from the default, on every saved embedding set.

The default clustering (:func:`vcn.pipeline.cluster`: quality screen, cannot-link, negative cut at
the lower quartile of the on-screen-together distances, group cut) decides some episodes by a
few hundredths: a held-out episode of dev-mv's kind sat 0.02 above a cliff, and the end-to-end
movie with 1-4 photos per appearance merged two 3-track people whose mean distance was 0.01 under
its cut. This benchmark moves one lever at a time and scores every set, so that a lever that helps
one set is seen with what it costs the others:

- ``order statistic``: the quantile read as the largest order statistic of the pairs at or below it
  with probability 0.5 (the estimator before :func:`vcn.clustering.linkage.negative_cut` fitted a
  normal); ``, confidence 0.75`` / ``0.9``: with that probability (lower cuts on small samples);
- ``no same-person reach``: the cut is not held under the reach of the movie's own same-person
  distances (:func:`vcn.clustering.linkage.same_person_reach`; the rule before 2026-12-06's last change);
- ``no quality screen``: every track clusters; none is left Unknown or joins afterwards;
- ``cut from every track``: the cut's sample keeps the on-screen pairs of the tracks the screen
  sets aside (more pairs; the screened tracks still only join afterwards);
- ``quality-weighted means`` / ``best half of crops``: a track's representative weighs its crops by
  their quality, or keeps the better half of them.

Reads the dumps of ``benchmarks/cluster_quality.py --dump`` and ``benchmarks/movie_quality.py --dump``
(the labels only score). Each lever is set for one clustering and restored after it.

Usage::

    python benchmarks/cut_levers.py benchmarks/work/dumps/mv_sface_ft.npz benchmarks/work/dumps/ep_sface_ft.npz \\
        benchmarks/work/dumps/bbt_sface_ft.npz benchmarks/work/dumps/buffymv_sface_ft.npz \\
        benchmarks/work/dumps/buffy2mv_sface.npz benchmarks/work/dumps/movie_cast_6p.npz \\
        benchmarks/work/dumps/movie_cast_6p_mv.npz benchmarks/work/dumps/movie_cast_8p_s1_mv.npz \\
        benchmarks/work/dumps/movie_cast_8p_s2.npz benchmarks/work/dumps/movie_cast_8p_s3_mv.npz
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vcn.clustering.dissimilarity as dissimilarity  # noqa: E402
import vcn.clustering.linkage as linkage  # noqa: E402
from benchmarks.cluster_rules import _scores, dump_sets, write_results  # noqa: E402
from vcn.pipeline import Embedded, cluster  # noqa: E402

#: A set counts as moved when BCubed F changes by more than this (points).
MOVED = 0.5


def lower_quantile_rank(n: int, quantile: float, confidence: float) -> int:
    """The 0-based rank of the largest order statistic of ``n`` samples that is at most the population's
    ``quantile`` with probability ``confidence`` or more (0 when none is): the k-th smallest is at most the
    q-quantile exactly when k or more samples fall below it, P(Binomial(n, q) >= k), whatever the distribution."""
    from scipy.stats import binom

    k = np.arange(1, n + 1)
    covered = k[binom.sf(k - 1, n, quantile) >= confidence]
    return int(covered[-1]) - 1 if len(covered) else 0


def order_statistic_cut(confidence: float) -> Callable:
    """:func:`vcn.clustering.linkage.negative_cut` with the quantile read as an order statistic of the pairs."""

    def cut(points, negatives, quantile: float = linkage.NEGATIVE_QUANTILE) -> float | None:
        values = linkage.negative_distances(points, negatives)
        if values is None:
            return None
        values = np.sort(values)
        return float(values[lower_quantile_rank(len(values), quantile, confidence)])

    return cut


def best_half(quality: np.ndarray, crop_track: np.ndarray) -> np.ndarray:
    """(N,) weight 1 for the better half (rounded up) of each track's crops by quality, ~0 for the rest."""
    weights = np.full(len(quality), 1e-6)
    order = np.lexsort((-quality, crop_track))
    starts = np.flatnonzero(np.r_[True, crop_track[order][1:] != crop_track[order][:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    for start, size in zip(starts, sizes):
        weights[order[start : start + (size + 1) // 2]] = 1.0
    return weights


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _weighted_factors(weights: np.ndarray) -> Callable:
    plain = dissimilarity.CosineDissimilarity.factors

    def factors(self, outputs):
        f = plain(self, outputs)
        return linkage.Factors(u=f.u * weights[:, None], v=f.v * weights[:, None], offset=f.offset)

    return factors


def _every_track_cut(embeddings: np.ndarray, crop_track: np.ndarray, n_tracks: int, cannot_link: np.ndarray) -> Callable:
    cosine = dissimilarity.CosineDissimilarity()
    tracks = np.flatnonzero(np.bincount(crop_track, minlength=n_tracks) > 0)
    position = np.full(n_tracks, -1)
    position[tracks] = np.arange(len(tracks))
    pairs = position[np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)]
    pairs = pairs[(pairs >= 0).all(axis=1)]
    points = linkage.track_points(cosine.factors(embeddings), crop_track, tracks, cosine.representative)
    plain = linkage.negative_cut

    def cut(_points, _negatives, quantile: float = linkage.NEGATIVE_QUANTILE):
        return plain(points, pairs, quantile)

    return cut


def lever(name: str, data: dict, key: str, quality: str) -> contextlib.AbstractContextManager:
    """The context in which ``cluster`` runs with lever ``name`` moved (see the module docstring)."""
    n_tracks = len(data["labels"])
    if name == "cut from every track":
        return _patched(linkage, "negative_cut", _every_track_cut(data[key], data["crop_track"], n_tracks,
                                                                   data["cannot_link"]))
    if name == "no same-person reach":
        return _patched(linkage, "same_person_reach", lambda points, negatives: None)
    if name.startswith("order statistic"):
        confidence = float(name.split()[-1]) if "confidence" in name else 0.5
        return _patched(linkage, "negative_cut", order_statistic_cut(confidence))
    if name == "quality-weighted means":
        return _patched(dissimilarity.CosineDissimilarity, "factors",
                        _weighted_factors(np.maximum(data[quality].astype(np.float64), 1e-3)))
    if name == "best half of crops":
        return _patched(dissimilarity.CosineDissimilarity, "factors",
                        _weighted_factors(best_half(data[quality].astype(np.float64), data["crop_track"])))
    return contextlib.nullcontext()


LEVERS = ("default", "no same-person reach", "order statistic", "order statistic, confidence 0.75", "order statistic, confidence 0.9",
          "no quality screen", "cut from every track", "quality-weighted means", "best half of crops")


def run(data: dict, key: str, quality: str, name: str) -> dict:
    with lever(name, data, key, quality):
        result = cluster(Embedded(data["crop_track"], data[key], data[quality], key), len(data["labels"]),
                         similarity="cosine", cannot_link=data["cannot_link"],
                         quality_screen=name != "no quality screen")
    return {**_scores(data["labels"], result.labels), "cut": round(result.clustering.cut, 4)}


def evaluate(path: Path) -> list[dict]:
    data = dict(np.load(path))
    rows = []
    for key, quality in dump_sets(data):
        row = {"dump": path.stem, "embeddings": key, "levers": {name: run(data, key, quality, name) for name in LEVERS}}
        print(path.stem, key, {k: v["bcubed_f"] for k, v in row["levers"].items()}, flush=True)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per lever: sets it raised and lowered by more than :data:`MOVED` BCubed F points, and its worst loss."""
    out = {}
    for name in LEVERS[1:]:
        deltas = [r["levers"][name]["bcubed_f"] - r["levers"]["default"]["bcubed_f"] for r in rows]
        out[name] = {"raised": sum(d > MOVED for d in deltas), "lowered": sum(d < -MOVED for d in deltas),
                     "worst": round(min(deltas), 2), "best": round(max(deltas), 2), "sets": len(deltas)}
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Levers on the negative cut, each moved alone",
        "",
        f"`benchmarks/cut_levers.py`, measured {result['measured_at']} on {result['machine']}, on the dumps of "
        "`benchmarks/cluster_quality.py --dump` and `benchmarks/movie_quality.py --dump`. Each cell: BCubed F % / PCR "
        "of the product's default clustering with one lever moved (the module docstring says what each does).",
        "",
        "| dump | embeddings | " + " | ".join(LEVERS) + " |",
        "|---|---|" + "---|" * len(LEVERS),
    ]
    for row in result["rows"]:
        cells = [f"{row['levers'][n]['bcubed_f']:.2f} / {row['levers'][n]['pcr']:.3f}" for n in LEVERS]
        lines.append(f"| {row['dump']} | {row['embeddings']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Against the default, sets raised / lowered by more than {MOVED} BCubed F points, and the largest loss and gain:",
        "",
        "| lever | raised | lowered | worst | best |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['raised']} of {s['sets']} | {s['lowered']} of {s['sets']} | {s['worst']:+.2f} | "
                     f"{s['best']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dumps", type=Path, nargs="+")
    parser.add_argument("--name", default="cut_levers")
    args = parser.parse_args(argv)
    rows = [row for path in args.dumps for row in evaluate(path)]
    write_results(args.name, {"rows": rows, "summary": summary(rows)}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
