"""Average-linkage clustering of tracks under cannot-link constraints, cut at a distance.

Average linkage (UPGMA) merges, one pair at a time, the two clusters whose tracks
are closest on average; every track weighs the same. Two clusters holding a pair
of tracks that are on screen together are never merged, and the merging stops
when the closest admissible pair is no closer than the cut. The distance between
a merged cluster and any other is the track-count-weighted mean of its parts'
(Lance-Williams), so one (T, T) matrix serves every round.

Memory is one (T, T) float32 matrix (1 GiB at 16,000 tracks, about a 2-hour film of
our test footage); time is O(T^2) per merge in the worst case, far less in practice since
only the rows whose nearest cluster was merged are searched again.
"""

from __future__ import annotations

import numpy as np

from vcn.clustering.dissimilarity import Factors
from vcn.clustering.parameter_free import UNKNOWN, ClusteringResult


def average_linkage(
    distances: np.ndarray,
    cut: float,
    *,
    cannot_link: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Average-linkage clusters of T items, merged while closer than ``cut`` and never across a cannot-link pair.

    Args:
        distances: (T, T) symmetric distances between items.
        cut: Merging stops when the closest admissible pair of clusters is at ``cut`` or farther.
        cannot_link: (P, 2) item pairs never to share a cluster.
        exclude: (T,) bool, items left out (labelled :data:`UNKNOWN`).
        overwrite: Work in ``distances`` itself (a float32 matrix the caller no longer needs)
            instead of a copy: at 16,000 items that copy is another GiB.

    Returns:
        (T,) int64 labels ``0..C-1`` numbered by decreasing cluster size (ties by first item),
        :data:`UNKNOWN` for excluded items.
    """
    d = np.asarray(distances, dtype=np.float32) if overwrite else np.array(distances, dtype=np.float32)
    n = len(d)
    if d.shape != (n, n):
        raise ValueError(f"distances must be a square matrix, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("distances must be finite")
    keep = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    # A pair that may never merge is at infinite distance. A merged cluster's distance is the
    # size-weighted mean of its parts', so it inherits every constraint of either part.
    if cannot_link is not None and len(cannot_link):
        pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
        if pairs.min() < 0 or pairs.max() >= n:
            raise ValueError(f"cannot_link holds indices outside 0..{n - 1}")
        d[pairs[:, 0], pairs[:, 1]] = np.inf
        d[pairs[:, 1], pairs[:, 0]] = np.inf
    np.fill_diagonal(d, np.inf)
    d[~keep, :] = np.inf
    d[:, ~keep] = np.inf
    size = keep.astype(np.float64)
    parent = np.arange(n)

    # Rows searched again at once: a copy of 32 MiB at most (many rows go stale when a large cluster merges).
    rows_at_once = max(1, (32 << 20) // (4 * max(n, 1)))
    nearest = d.argmin(axis=1) if n else np.zeros(0, dtype=np.int64)
    nearest_d = d[np.arange(n), nearest]
    while n:
        i = int(nearest_d.argmin())
        if not nearest_d[i] < cut:
            break
        j = int(nearest[i])
        # Merge j into i.
        with np.errstate(invalid="ignore"):
            row = ((size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])).astype(np.float32)
        row[i] = row[j] = np.inf
        d[i], d[:, i] = row, row
        d[j, :] = np.inf
        d[:, j] = np.inf
        size[i] += size[j]
        size[j] = 0
        parent[parent == j] = i
        nearest[i] = row.argmin()
        nearest_d[i] = row[nearest[i]]
        nearest_d[j] = np.inf
        # Rows whose nearest was i or j search again; the others only compare with the new cluster.
        stale = np.flatnonzero((nearest == i) | (nearest == j))
        stale = stale[(stale != i) & (stale != j)]
        for first in range(0, len(stale), rows_at_once):
            part = stale[first : first + rows_at_once]
            nearest[part] = d[part].argmin(axis=1)
            nearest_d[part] = d[part, nearest[part]]
        closer = row < nearest_d
        nearest[closer] = i
        nearest_d[closer] = row[closer]
    return _number_by_size(parent, keep)


def _number_by_size(parent: np.ndarray, keep: np.ndarray) -> np.ndarray:
    labels = np.full(len(parent), UNKNOWN, dtype=np.int64)
    roots = parent[keep]
    if not len(roots):
        return labels
    uniq, first, counts = np.unique(roots, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    number = np.empty(len(uniq), dtype=np.int64)
    number[order] = np.arange(len(uniq))
    labels[keep] = number[np.searchsorted(uniq, roots)]
    return labels


#: The cut is this quantile of the distances between tracks known to be different people. Swept over
#: 0.05-0.5 on six embedding sets (benchmarks/results/cluster_rules.md), BCubed F stays within about 2
#: points of its best from 0.15 to 0.3 on all but one, and 0.25 keeps PCR in [0.9, 1.3] on the
#: development episodes (more clusters than people below it, merged people above).
NEGATIVE_QUANTILE = 0.25
#: Fewer known different-person pairs than this give no cut (the quantile would be noise).
MIN_NEGATIVES = 10
#: The cut is the largest order statistic of the pairs that lies at or below :data:`NEGATIVE_QUANTILE`
#: with at least this probability. On a movie's hundreds or thousands of pairs that is the quantile
#: itself (within a few thousandths on every benchmark set). On a short clip's few pairs, interpolating
#: between order statistics (``np.quantile``) lands above the true quantile more often than not (with 10
#: pairs: the 3rd and 4th smallest, each above it with probability 0.53 and 0.78), and a cut drawn high
#: merges two people, which an analyst cannot undo by merging clusters.
CUT_CONFIDENCE = 0.5


def negative_cut(distances: np.ndarray, negatives: np.ndarray | None) -> float | None:
    """The movie's own cut: :data:`NEGATIVE_QUANTILE` of the distances of its known different-person pairs,
    bounded from below at :data:`CUT_CONFIDENCE` (:func:`lower_quantile_rank`).

    Tracks on screen together are two people, so their distances sample how far
    apart different people are for this model on this movie (measured on the
    development episodes: their quantiles match those of all different-person
    pairs within 0.025, for the dlib ResNet and SFace alike, whose distance scales
    differ tenfold). A fixed quantile of that sample is a cut in the model's own
    units, with no threshold to tune per model or per finetuned checkpoint.

    Returns:
        The cut, or None with fewer than :data:`MIN_NEGATIVES` distinct finite pairs.
    """
    if negatives is None or len(negatives) == 0:
        return None
    pairs = np.unique(np.sort(np.asarray(negatives, dtype=np.int64).reshape(-1, 2), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    values = np.asarray(distances)[pairs[:, 0], pairs[:, 1]]
    values = values[np.isfinite(values)]
    if len(values) < MIN_NEGATIVES:
        return None
    values = np.sort(values)
    return float(values[lower_quantile_rank(len(values), NEGATIVE_QUANTILE, CUT_CONFIDENCE)])


def lower_quantile_rank(n: int, quantile: float, confidence: float) -> int:
    """The 0-based rank of the largest order statistic of ``n`` samples that is at most the population's
    ``quantile`` with probability ``confidence`` or more (0 when none is: the smallest sample).

    The k-th smallest of n samples is at most the q-quantile exactly when k or more samples fall below it,
    which happens with probability P(Binomial(n, q) >= k), whatever the distribution.
    """
    from scipy.stats import binom

    k = np.arange(1, n + 1)
    covered = k[binom.sf(k - 1, n, quantile) >= confidence]
    return int(covered[-1]) - 1 if len(covered) else 0


def track_distances(factors: Factors, crop_track: np.ndarray, tracks: np.ndarray, representatives) -> np.ndarray:
    """(len(tracks), len(tracks)) dissimilarities between the representatives of the given tracks' crops.

    Args:
        factors: :class:`vcn.clustering.dissimilarity.Factors` of every crop.
        crop_track: (N,) track of each crop.
        tracks: Track indices to compare (each with at least one crop).
        representatives: :meth:`vcn.clustering.dissimilarity.Dissimilarity.representative`.
    """
    rep_u, rep_v = _track_representatives(factors, crop_track, tracks, representatives)
    # A block of rows at a time, so that the (T, T) result is the only matrix of that size.
    n = len(tracks)
    out = np.empty((n, n), dtype=np.float32)
    step = max(1, (32 << 20) // (4 * max(n, 1)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[start:stop] = _between(rep_u[start:stop], rep_v[start:stop], rep_u, rep_v, factors.offset)
    return out


def _between(a_u: np.ndarray, a_v: np.ndarray, b_u: np.ndarray, b_v: np.ndarray, offset: float) -> np.ndarray:
    """(len(a), len(b)) float32 dissimilarities between two sets of representatives (their left and right factors)."""
    block = a_u @ b_v.T
    block += a_v @ b_u.T
    block *= 0.5
    block += offset
    return block


def _track_representatives(
    factors: Factors, crop_track: np.ndarray, tracks: np.ndarray, representatives
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (len(tracks), K) left and right factors of each given track's representative."""
    position = np.full(int(crop_track.max(initial=-1)) + 1, -1, dtype=np.int64)
    position[tracks] = np.arange(len(tracks))
    rows = position[crop_track]
    keep = rows >= 0
    counts = np.bincount(rows[keep], minlength=len(tracks)).astype(np.float64)[:, None]
    sum_u = np.zeros((len(tracks), factors.u.shape[1]))
    sum_v = np.zeros((len(tracks), factors.v.shape[1]))
    np.add.at(sum_u, rows[keep], factors.u[keep])
    np.add.at(sum_v, rows[keep], factors.v[keep])
    rep_u, rep_v = representatives(sum_u / counts, sum_v / counts)
    return np.asarray(rep_u, dtype=np.float32), np.asarray(rep_v, dtype=np.float32)


def attach_to_clusters(
    factors: Factors,
    crop_track: np.ndarray,
    labels: np.ndarray,
    candidates: np.ndarray,
    cut: float,
    cannot_link: np.ndarray,
    representatives,
) -> np.ndarray:
    """Candidate tracks join the finished cluster they are nearest to, if that is within ``cut``.

    A track joins the cluster whose average distance to it (the distance average
    linkage merges by) is smallest and below ``cut``, unless the cluster holds a
    track on screen with it. The candidates never shape a cluster: they are
    judged one at a time against the clusters the other tracks made, the nearest
    first, and one that joins a cluster keeps the tracks on screen with it out.

    Args:
        factors: Factors of every crop.
        crop_track: (N,) track of each crop.
        labels: (T,) clusters of the other tracks, :data:`UNKNOWN` for the candidates and tracks left out.
        candidates: Track indices that may join (each with crops, each :data:`UNKNOWN` in ``labels``).
        cut: The clustering's cut.
        cannot_link: (P, 2) track pairs on screen together.
        representatives: As :func:`track_distances`.

    Returns:
        (T,) labels with the candidates that joined a cluster in it.
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    candidates = np.asarray(candidates, dtype=np.int64)
    clustered = np.flatnonzero(labels != UNKNOWN)
    if not len(candidates) or not len(clustered):
        return labels
    n_clusters = int(labels.max()) + 1
    everyone = np.concatenate([candidates, clustered])
    rep_u, rep_v = _track_representatives(factors, np.asarray(crop_track, dtype=np.int64), everyone, representatives)
    cand_u, cand_v = rep_u[: len(candidates)], rep_v[: len(candidates)]
    clus_u, clus_v = rep_u[len(candidates) :], rep_v[len(candidates) :]
    from scipy.sparse import csr_matrix

    sizes = np.bincount(labels[clustered], minlength=n_clusters).astype(np.float64)
    member = csr_matrix(
        (np.ones(len(clustered)), (np.arange(len(clustered)), labels[clustered])), shape=(len(clustered), n_clusters)
    )
    # Average distance of each candidate to each cluster, a block of candidates at a time.
    mean = np.empty((len(candidates), n_clusters))
    step = max(1, (32 << 20) // (4 * len(clustered)))
    for start in range(0, len(candidates), step):
        stop = min(len(candidates), start + step)
        block = _between(cand_u[start:stop], cand_v[start:stop], clus_u, clus_v, factors.offset)
        mean[start:stop] = (member.T @ block.T.astype(np.float64)).T / sizes
    # Clusters each candidate may not join: those holding a track on screen with it.
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    partners: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    row_of = {int(t): i for i, t in enumerate(candidates)}
    for t, i in row_of.items():
        blocked = [labels[u] for u in partners.get(t, ()) if labels[u] != UNKNOWN]
        mean[i, blocked] = np.inf
    # Nearest first; a join blocks that cluster for the candidates on screen with the one that joined.
    while True:
        i, c = np.unravel_index(np.argmin(mean), mean.shape)
        if not mean[i, c] < cut:
            break
        t = int(candidates[i])
        labels[t] = c
        mean[i, :] = np.inf
        for u in partners.get(t, ()):
            if u in row_of:
                mean[row_of[u], c] = np.inf
    return labels


def cluster_by_negative_cut(
    factors: Factors,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray,
    exclude: np.ndarray | None,
    representatives,
    attach: np.ndarray | None = None,
) -> ClusteringResult | None:
    """Tracks clustered by constrained average linkage cut at :func:`negative_cut`; None when the movie has too
    few tracks on screen together to give a cut.

    Args: as :func:`vcn.clustering.parameter_free.cluster_tracks` (``cannot_link`` required: it is both the
    constraint and the sample of different-person distances), and
        attach: (T,) bool, tracks kept out of the linkage and of the cut that afterwards join the cluster
            they are within the cut of (:func:`attach_to_clusters`), e.g. low-quality tracks: they may
            join a person's cluster, but never make one or bridge two.

    Returns:
        A :class:`vcn.clustering.parameter_free.ClusteringResult` (``rounds``: merges made), or None.
    """
    crop_track = np.asarray(crop_track, dtype=np.int64)
    if crop_track.shape != (len(factors),):
        raise ValueError(f"crop_track must have one entry per crop ({len(factors)}), got shape {crop_track.shape}")
    if len(crop_track) and (crop_track.min() < 0 or crop_track.max() >= n_tracks):
        raise ValueError(f"crop_track holds indices outside 0..{n_tracks - 1}")
    active = np.bincount(crop_track, minlength=n_tracks) > 0
    if exclude is not None:
        active &= ~np.asarray(exclude, dtype=bool)
    joining = np.zeros(n_tracks, dtype=bool)
    if attach is not None:
        joining = active & np.asarray(attach, dtype=bool)
        active &= ~joining
    tracks = np.flatnonzero(active)
    position = np.full(n_tracks, -1, dtype=np.int64)
    position[tracks] = np.arange(len(tracks))
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n_tracks):
        raise ValueError(f"cannot_link holds track indices outside 0..{n_tracks - 1}")
    pairs = position[pairs]
    pairs = pairs[(pairs >= 0).all(axis=1)]
    if len(tracks) < 2:
        return None
    distances = track_distances(factors, crop_track, tracks, representatives)
    cut = negative_cut(distances, pairs)
    if cut is None:
        return None
    local = average_linkage(distances, cut, cannot_link=pairs, overwrite=True)
    labels = np.full(n_tracks, UNKNOWN, dtype=np.int64)
    labels[tracks] = local
    n_clusters = int(local.max()) + 1 if len(local) else 0
    if joining.any():
        before = labels
        labels = attach_to_clusters(
            factors, crop_track, labels, np.flatnonzero(joining), cut, cannot_link, representatives
        )
        attached = int((labels != before).sum())
    else:
        attached = 0
    return ClusteringResult(
        labels=labels, n_clusters=n_clusters, rounds=len(tracks) - n_clusters, rule="negative-cut", cut=cut,
        attached=attached,
    )
