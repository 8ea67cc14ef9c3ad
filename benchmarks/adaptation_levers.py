"""Cheap adaptation levers measured on saved embeddings: within-track covariance normalisation, and a metric learned
from the movie's own pairs.

The self-distillation of ``vcn.identity.selfsup`` adapts the backbone to a movie from
pairs of crops of one track. A closed-form relative of it needs no training: the
movie's tracks give the within-person scatter S_w of the crop embeddings around
their track's mean (pose, expression, lighting, and in ``dev-mv`` a change of photo
inside a track), and whitening by it, x -> S_w^(-1/2) x, shrinks the directions a
person varies along before the cosine is taken (within-class covariance
normalisation, as in speaker verification). It uses positives only (tracks), never
the on-screen-together pairs, so the label-free check stays fair to it.

For each dump of ``benchmarks/cluster_quality.py --dump`` this reports, for the
pretrained embeddings and for the whitened ones at several shrinkages of S_w
towards a multiple of the identity (0: plain S_w; Ledoit-Wolf's estimate of the
best one), the label-free separation the pipeline's check compares, the true
recall at the check's false-merge rates (labels) and the default clustering
(``cluster_movie``: quality screen, cannot-link, negative cut).

The second lever uses the negatives too: a Mahalanobis metric learned from the movie's
own constraints (KISSME, Koestinger et al. 2012: ``M = S_same^-1 - S_diff^-1`` projected
onto the positive semidefinite cone, ``S_same`` the covariance of differences of two
crops of one track, ``S_diff`` of two crops of tracks on screen together, both shrunk by
:data:`KISS_SHRINKAGE`). The negative cut is drawn from those same pairs, which the metric has
pushed apart, so it is measured on a split: the metric learns from half of the
on-screen-together pairs and the clustering (constraints and cut) uses the other half, for
the learned metric and for the pretrained embeddings alike, over :data:`KISS_SPLITS` splits.

To tell a lever's effect from the clustering's own sensitivity it also reports the
spread of the pretrained clustering when each draw keeps a random
:data:`KEEP` of the crops (every track keeps at least one): the same model, the same
tracks, slightly different track means.

Usage::

    python benchmarks/adaptation_levers.py benchmarks/work/dumps/mv_sface.npz benchmarks/work/dumps/ep_sface.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.adaptation_check import default_scores, true_recall
from benchmarks.cluster_rules import write_results
from vcn.identity.selfsup.separation import FALSE_MERGE_RATES, separation

#: Shrinkages of S_w towards trace(S_w)/d * I measured besides Ledoit-Wolf's.
SHRINKAGES = (0.0, 0.1, 0.3, 0.5)
#: Shrinkage of both covariances of the learned metric, and the random splits of the negatives it is measured on.
KISS_SHRINKAGE, KISS_SPLITS = 0.3, 3
#: Crop pairs drawn per on-screen-together track pair for the learned metric's S_diff.
KISS_CROPS_PER_PAIR = 20
#: Share of the crops each resampling draw keeps, and the number of draws.
KEEP, DRAWS = 0.8, 10


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def track_residuals(x: np.ndarray, crop_track: np.ndarray) -> np.ndarray:
    """Each crop's offset from its track's mean, for tracks of at least two crops."""
    _, rows, counts = np.unique(crop_track, return_inverse=True, return_counts=True)
    means = np.zeros((len(counts), x.shape[1]))
    np.add.at(means, rows, x)
    means /= counts[:, None]
    keep = counts[rows] > 1
    return (x - means[rows])[keep]


def ledoit_wolf(residuals: np.ndarray) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity of the residuals' covariance towards a scaled identity."""
    n, d = residuals.shape
    s = residuals.T @ residuals / n
    mu = np.trace(s) / d
    delta = float(((s - mu * np.eye(d)) ** 2).sum())
    # beta = mean over rows of ||r r^T - S||_F^2, divided by n (Ledoit-Wolf's b-bar squared).
    squares = (residuals**2).sum(axis=1)
    beta = float((squares**2).mean() - 2 * np.einsum("ij,jk,ik->i", residuals, s, residuals).mean() + (s**2).sum())
    return float(min(1.0, max(0.0, beta / n / delta)))


def _shrunk(s: np.ndarray, shrink: float) -> np.ndarray:
    return (1 - shrink) * s + shrink * np.trace(s) / len(s) * np.eye(len(s))


def whitening(residuals: np.ndarray, shrink: float) -> np.ndarray:
    """S^(-1/2) of the residuals' covariance shrunk by ``shrink`` towards trace(S)/d * I."""
    s = _shrunk(residuals.T @ residuals / len(residuals), shrink)
    values, vectors = np.linalg.eigh(s)
    return vectors @ np.diag(np.maximum(values, 1e-12) ** -0.5) @ vectors.T


def kissme(x: np.ndarray, crop_track: np.ndarray, negatives: np.ndarray, seed: int) -> np.ndarray:
    """(D, D) map L with L L^T the KISSME metric learned from the tracks (positives) and ``negatives``."""
    residuals = track_residuals(x, crop_track)
    same = 2 * residuals.T @ residuals / len(residuals)  # the covariance of a difference of two crops of a track
    rng = np.random.default_rng(seed)
    crops = {int(t): np.flatnonzero(crop_track == t) for t in np.unique(crop_track)}
    diffs = np.concatenate([
        x[rng.choice(crops[a], KISS_CROPS_PER_PAIR)] - x[rng.choice(crops[b], KISS_CROPS_PER_PAIR)]
        for a, b in negatives.tolist() if a in crops and b in crops
    ])
    diff = diffs.T @ diffs / len(diffs)
    metric = np.linalg.inv(_shrunk(same, KISS_SHRINKAGE)) - np.linalg.inv(_shrunk(diff, KISS_SHRINKAGE))
    values, vectors = np.linalg.eigh(metric)
    return vectors * np.sqrt(np.maximum(values, 0.0))


def learned_metric_rows(path: Path, data, x: np.ndarray) -> list[dict]:
    """The KISSME lever on :data:`KISS_SPLITS` splits of the negatives: learn on one half, cluster with the other."""
    crop_track, pairs, labels, quality = data["crop_track"], data["cannot_link"], data["labels"], data["quality"]
    rows = []
    for split in range(KISS_SPLITS):
        order = np.random.default_rng(split).permutation(len(pairs))
        learn, held = pairs[order[::2]], pairs[order[1::2]]
        learned = _unit(x @ kissme(x, crop_track, learn, split))
        for name, embeddings in (("pretrained", x), (f"KISSME, shrinkage {KISS_SHRINKAGE}", learned)):
            row = {"dump": path.stem, "embeddings": f"{name}, split {split} (held-out half of the negatives)",
                   "shrinkage": KISS_SHRINKAGE if embeddings is learned else None,
                   "separation": round(separation(embeddings, crop_track, held)[0], 4),
                   "tar": true_recall(embeddings, crop_track, labels, held),
                   **default_scores(embeddings, crop_track, labels, held, quality)}
            print(row, flush=True)
            rows.append(row)
    return rows


def resampling_spread(data, draws: int = DRAWS, keep: float = KEEP) -> dict:
    """BCubed F % of the default clustering of the pretrained embeddings over ``draws`` random crop subsets."""
    crop_track = data["crop_track"]
    first = np.unique(crop_track, return_index=True)[1]
    scores = []
    for seed in range(draws):
        kept = np.random.default_rng(seed).random(len(crop_track)) < keep
        kept[first] = True
        scores.append(default_scores(data["pretrained"][kept], crop_track[kept], data["labels"], data["cannot_link"],
                                     data["quality"][kept])["bcubed_f"])
    return {"draws": draws, "keep": keep, "bcubed_f": scores, "mean": round(float(np.mean(scores)), 2),
            "sd": round(float(np.std(scores, ddof=1)), 2), "min": min(scores), "max": max(scores)}


def evaluate(path: Path) -> list[dict]:
    data = np.load(path)
    crop_track, pairs, labels, quality = data["crop_track"], data["cannot_link"], data["labels"], data["quality"]
    x = _unit(data["pretrained"].astype(np.float64))
    residuals = track_residuals(x, crop_track)
    lw = ledoit_wolf(residuals)
    variants = [("pretrained", None, x)]
    for shrink in (*SHRINKAGES, lw):
        name = f"whitened, shrinkage {shrink:.3f}" + (" (Ledoit-Wolf)" if shrink == lw else "")
        variants.append((name, shrink, _unit(x @ whitening(residuals, shrink))))
    rows = []
    for name, shrink, embeddings in variants:
        share, _ = separation(embeddings, crop_track, pairs)
        row = {"dump": path.stem, "embeddings": name, "shrinkage": shrink, "separation": round(share, 4),
               "tar": true_recall(embeddings, crop_track, labels, pairs),
               **default_scores(embeddings, crop_track, labels, pairs, quality)}
        print(row, flush=True)
        rows.append(row)
    rows[0]["resampling"] = resampling_spread(data)
    print(rows[0]["resampling"], flush=True)
    return rows + learned_metric_rows(path, data, x)


def markdown(result: dict) -> str:
    rates = " / ".join(f"{f:g}" for f in FALSE_MERGE_RATES)
    lines = [
        "# Adaptation levers on saved embeddings: within-track covariance normalisation, a metric learned from the "
        "movie's pairs",
        "",
        f"`benchmarks/adaptation_levers.py`, measured {result['measured_at']} on {result['machine']}, on the "
        "pretrained embeddings of `benchmarks/cluster_quality.py --dump`. Separation: the label-free share the "
        f"pipeline's adaptation check compares (on-screen-together quantiles {rates}, averaged; higher looks better "
        "to the check). TAR: the true share of same-person track pairs closer than those quantiles (labels). "
        "Clustering: the default pipeline (quality screen, cannot-link, negative cut). Rows 'split k': the learned "
        f"metric (KISSME) learns from one half of the on-screen-together pairs and is scored, with the pretrained "
        f"embeddings beside it, on the other half (constraints, cut, separation and TAR), {KISS_SPLITS} random splits.",
        "",
        "| dump | embeddings | separation | TAR | WCP % | PCR | BCubed F % | NMI % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['dump']} | {r['embeddings']} | {r['separation']} | {r['tar']} | {r['wcp']} | "
                     f"{r['pcr']} | {r['bcubed_f']} | {r['nmi']} |")
    lines += [
        "",
        f"The clustering's own spread: the pretrained embeddings, each of {DRAWS} draws keeping a random "
        f"{KEEP:.0%} of the crops (every track at least one), BCubed F %:",
        "",
        "| dump | mean | sd | min | max |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "resampling" in r:
            s = r["resampling"]
            lines.append(f"| {r['dump']} | {s['mean']} | {s['sd']} | {s['min']} | {s['max']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dumps", nargs="+", type=Path, help="files from cluster_quality.py --dump")
    parser.add_argument("--name", default="adaptation_levers", help="stem of the results files")
    args = parser.parse_args(argv)
    rows = [row for path in args.dumps for row in evaluate(path)]
    write_results(args.name, {"rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
