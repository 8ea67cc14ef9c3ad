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


def negative_cut(distances: np.ndarray, negatives: np.ndarray | None) -> float | None:
    """The movie's own cut: :data:`NEGATIVE_QUANTILE` of the distances of its known different-person pairs.

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
    return float(np.quantile(values, NEGATIVE_QUANTILE))


def track_distances(factors: Factors, crop_track: np.ndarray, tracks: np.ndarray, representatives) -> np.ndarray:
    """(len(tracks), len(tracks)) dissimilarities between the representatives of the given tracks' crops.

    Args:
        factors: :class:`vcn.clustering.dissimilarity.Factors` of every crop.
        crop_track: (N,) track of each crop.
        tracks: Track indices to compare (each with at least one crop).
        representatives: :meth:`vcn.clustering.dissimilarity.Dissimilarity.representative`.
    """
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
    rep_u = np.asarray(rep_u, dtype=np.float32)
    rep_v = np.asarray(rep_v, dtype=np.float32)
    # A block of rows at a time, so that the (T, T) result is the only matrix of that size.
    n = len(tracks)
    out = np.empty((n, n), dtype=np.float32)
    step = max(1, (32 << 20) // (4 * max(n, 1)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = rep_u[start:stop] @ rep_v.T
        block += rep_v[start:stop] @ rep_u.T
        block *= 0.5
        block += factors.offset
        out[start:stop] = block
    return out


def cluster_by_negative_cut(
    factors: Factors,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray,
    exclude: np.ndarray | None,
    representatives,
) -> ClusteringResult | None:
    """Tracks clustered by constrained average linkage cut at :func:`negative_cut`; None when the movie has too
    few tracks on screen together to give a cut.

    Args: as :func:`vcn.clustering.parameter_free.cluster_tracks` (``cannot_link`` required: it is both the
    constraint and the sample of different-person distances).

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
    return ClusteringResult(
        labels=labels, n_clusters=n_clusters, rounds=len(tracks) - n_clusters, rule="negative-cut", cut=cut
    )
