"""Cluster identities: a person keeps their cluster number, and analysts' edits, when a movie is clustered again.

A clustering numbers its clusters by size ("0" the largest). Re-clustering the
same movie (a new model version, another setting) would renumber them, and the
number is what analysts see, name and refer to. :func:`stable_cluster_ids`
matches the new clusters to the previous assignment of the same tracks, one to
one, maximising the number of tracks they share (the Hungarian method on the
overlap counts), and gives each new cluster the id of its match. New clusters
without a match take fresh ids above every id used before, largest first, so an
id never comes back meaning someone else.

Analysts then correct the clustering by tracks, not numbers (:class:`Edit`:
name, merge, split), so their word survives every later clustering:
:func:`apply_edits` replays a movie's edits on a fresh assignment,
:func:`add_edit` checks a new one against them, and :func:`cluster_table` gives
the result the columns ``face_clusters`` stores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from vcn.clustering.parameter_free import UNKNOWN


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


#: What an analyst can say about clusters (:class:`Edit`).
ACTIONS = ("name", "merge", "split")


@dataclass(frozen=True)
class Edit:
    """An analyst's statement about some tracks, kept apart from any clustering.

    Edits name tracks, not cluster numbers, so they survive re-clustering:

    * ``name``: the person of these tracks is ``name`` (the cluster holding most
      of them gets it);
    * ``merge``: these tracks are one person (their clusters become one);
    * ``split``: these tracks are one person, apart from the rest of their
      clusters (they leave them for a cluster of their own).

    Raises:
        ValueError: An action not in :data:`ACTIONS`, or a ``name`` edit without a name.
    """

    action: str
    tracks: tuple[int, ...]
    name: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown edit action {self.action!r}; known: {', '.join(ACTIONS)}")
        if self.action == "name" and not (self.name or "").strip():
            raise ValueError("a name edit needs a non-empty name")
        # Track ids as plain ints, whatever sequence (a DuckDB list, numpy) they came in.
        object.__setattr__(self, "tracks", tuple(int(t) for t in self.tracks))


def apply_edits(
    track_ids: np.ndarray,
    labels: np.ndarray,
    edits: Sequence[Edit],
    cannot_link: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[int, str], list[str]]:
    """An assignment with the analysts' edits applied, oldest first.

    Unknown tracks stay Unknown: an edit acts on the clustered tracks it names.
    A merge that would put two tracks on screen together (``cannot_link``, rows
    of positions in ``track_ids``) into one cluster is skipped, with a reason.

    Args:
        track_ids: (T,) track ids.
        labels: (T,) cluster ids (:data:`UNKNOWN` for none), e.g. from
            :func:`stable_cluster_ids`.
        edits: The movie's edits, oldest first.
        cannot_link: (P, 2) positions of tracks on screen together.

    Returns:
        The edited (T,) cluster ids (a split takes an id above all in use), the
        name of each named cluster, and one line per edit skipped.
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    position = {int(t): i for i, t in enumerate(np.asarray(track_ids).tolist())}
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2) if cannot_link is not None else np.zeros((0, 2), np.int64)
    names: dict[int, str] = {}
    skipped: list[str] = []
    for edit in edits:
        rows = np.array([position[t] for t in edit.tracks if t in position], dtype=np.int64)
        rows = rows[labels[rows] != UNKNOWN] if len(rows) else rows
        if not len(rows):
            skipped.append(f"{edit.action} of tracks {list(edit.tracks)[:5]}: none of them is clustered now")
            continue
        if edit.action == "merge":
            clusters = np.unique(labels[rows])
            members = np.isin(labels, clusters)
            together = members[pairs[:, 0]] & members[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
            if together.any():
                a, b = pairs[np.flatnonzero(together)[0]]
                skipped.append(
                    f"merge of clusters {clusters.tolist()}: tracks {track_ids[a]} and {track_ids[b]} are on screen together"
                )
                continue
            keep = int(clusters.min())
            labels[members] = keep
            for cluster in clusters.tolist():
                if cluster != keep and cluster in names:
                    names.setdefault(keep, names.pop(cluster))
        elif edit.action == "split":
            if np.isin(labels, np.unique(labels[rows])).sum() == len(rows):
                continue  # the tracks are already a cluster of their own
            labels[rows] = int(labels.max()) + 1
        else:  # name
            values, counts = np.unique(labels[rows], return_counts=True)
            names[int(values[np.argmax(counts)])] = str(edit.name)
    present = set(labels[labels != UNKNOWN].tolist())
    return labels, {c: n for c, n in names.items() if c in present}, skipped


def add_edit(
    track_ids: np.ndarray,
    labels: np.ndarray,
    edits: Sequence[Edit],
    new: Edit,
    cannot_link: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[int, str], list[str]]:
    """:func:`apply_edits` with an analyst's new edit after the earlier ones, refusing it if it does not apply.

    An earlier edit that no longer applies (its tracks went Unknown, a later
    merge put them on screen together) does not stop a new one: it is only
    reported. The new edit itself must apply, or the analyst would record a
    statement that changes nothing.

    Args:
        track_ids: (T,) track ids of the clustering.
        labels: (T,) its automatic cluster ids (:data:`UNKNOWN` for none).
        edits: The earlier edits, oldest first.
        new: The edit to add.
        cannot_link: (P, 2) positions of tracks on screen together.

    Returns:
        As :func:`apply_edits` over ``[*edits, new]``: the skipped lines are
        the earlier edits'.

    Raises:
        ValueError: ``new`` names tracks absent from ``track_ids``, or cannot be
            applied (a merge of tracks on screen together, tracks all Unknown).
    """
    absent = sorted(set(new.tracks) - set(np.asarray(track_ids).tolist()))
    if absent:
        raise ValueError(f"no tracks {absent[:10]} in the clustering")
    _, _, before = apply_edits(track_ids, labels, edits, cannot_link)
    edited, names, skipped = apply_edits(track_ids, labels, [*edits, new], cannot_link)
    if len(skipped) > len(before):
        raise ValueError(f"edit not applied: {skipped[-1]}")
    return edited, names, skipped


def cluster_table(track_ids: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> pl.DataFrame:
    """``track_id``, ``cluster`` (null for Unknown) and ``name`` (null for an unnamed cluster) per track.

    The columns an assignment takes in ``face_clusters``, where Unknown is a
    null rather than :data:`UNKNOWN`.
    """
    clusters = [None if c == UNKNOWN else int(c) for c in np.asarray(labels).tolist()]
    return pl.DataFrame(
        {
            "track_id": track_ids,
            "cluster": clusters,
            "name": [None if c is None else names.get(c) for c in clusters],
        },
        schema={"track_id": pl.Int64, "cluster": pl.Int64, "name": pl.String},
    )
