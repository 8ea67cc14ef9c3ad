"""Stable cluster ids: a person keeps their cluster number when a movie is clustered again.

A clustering numbers its clusters by size ("0" the largest). Re-clustering the
same movie (a new model version, another setting) would renumber them, and the
number is what analysts see, name and refer to. :func:`stable_cluster_ids`
matches the new clusters to the previous assignment of the same tracks, one to
one, maximising the number of tracks they share (the Hungarian method on the
overlap counts), and gives each new cluster the id of its match. New clusters
without a match take fresh ids above every id used before, largest first, so an
id never comes back meaning someone else.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Label of a track left Unknown (no cluster), as in :mod:`vcn.clustering`.
UNKNOWN = -1


def stable_cluster_ids(
    track_ids: np.ndarray, labels: np.ndarray, previous: Mapping[int, int] | None = None
) -> np.ndarray:
    """New cluster ids for ``labels`` that keep the ids of ``previous`` where the clusters match.

    Args:
        track_ids: (T,) track ids.
        labels: (T,) cluster of each track from the new clustering (any integers),
            :data:`UNKNOWN` for none.
        previous: Track id -> cluster id of the previous assignment of the movie
            (Unknown tracks absent); None or empty for a first clustering.

    Returns:
        (T,) int64 ids, :data:`UNKNOWN` where ``labels`` is. Without a previous
        assignment: 0 for the largest cluster, 1 for the next, and so on (ties by
        first track).

    Raises:
        ValueError: If ``track_ids`` and ``labels`` differ in length.
    """
    from scipy.optimize import linear_sum_assignment

    track_ids = np.asarray(track_ids)
    labels = np.asarray(labels, dtype=np.int64)
    if track_ids.shape != labels.shape:
        raise ValueError(f"one label per track: {len(track_ids)} tracks, {len(labels)} labels")
    out = np.full(len(labels), UNKNOWN, dtype=np.int64)
    clustered = labels != UNKNOWN
    if not clustered.any():
        return out
    # New clusters by size, largest first (ties: the cluster of the earliest track).
    values, first, counts = np.unique(labels[clustered], return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    new_clusters = values[order]
    index_of = {int(c): i for i, c in enumerate(new_clusters)}

    previous = dict(previous or {})
    old_clusters = np.array(sorted(set(previous.values())), dtype=np.int64)
    assigned: dict[int, int] = {}
    if len(old_clusters):
        old_index = {int(c): j for j, c in enumerate(old_clusters)}
        overlap = np.zeros((len(new_clusters), len(old_clusters)), dtype=np.int64)
        for track, label in zip(track_ids[clustered].tolist(), labels[clustered].tolist()):
            old = previous.get(track)
            if old is not None:
                overlap[index_of[label], old_index[old]] += 1
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        for i, j in zip(rows, cols):
            if overlap[i, j] > 0:
                assigned[int(new_clusters[i])] = int(old_clusters[j])
    next_id = int(old_clusters.max()) + 1 if len(old_clusters) else 0
    for cluster in new_clusters.tolist():
        if cluster not in assigned:
            assigned[cluster] = next_id
            next_id += 1
    out[clustered] = [assigned[c] for c in labels[clustered].tolist()]
    return out
