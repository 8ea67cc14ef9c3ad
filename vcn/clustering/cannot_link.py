"""Cannot-link constraints: tracks on screen together are different people.

Two faces in one frame belong to two people, so tracks of the same shot whose
frame ranges overlap may never share a cluster. Movies and track datasets both
describe their tracks by shot and frame range, and both get their constraints
here.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def on_screen_together(tracks: pl.DataFrame) -> np.ndarray:
    """Pairs of tracks that share a shot and whose frame ranges overlap.

    Two such tracks are on screen at once, so they are different people: the
    cannot-link constraints of clustering. Ranges are inclusive, so tracks
    ending and starting on the same frame overlap.

    The work is sorting plus one binary search per track: after sorting by
    (shot, start), the partners of a track that come after it are exactly the
    following tracks of its shot that start no later than it ends, a
    contiguous run. Linear in the number of tracks plus the number of pairs.

    Args:
        tracks: ``shot_id``, ``start_frame``, ``end_frame`` per track, e.g.
            :attr:`vcn.formats.trackset.TrackSet.tracks` or a movie's ``tracks`` table.

    Returns:
        (P, 2) int64 row indices ``i < j`` into ``tracks``, sorted by ``i`` then ``j``.
    """
    missing = [name for name in ("shot_id", "start_frame", "end_frame") if name not in tracks.columns]
    if missing:
        raise ValueError(f"tracks lacks column(s) {missing}; has {tracks.columns}")
    n = tracks.height
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    starts = tracks["start_frame"].to_numpy().astype(np.int64)
    ends = tracks["end_frame"].to_numpy().astype(np.int64)
    _, shots = np.unique(tracks["shot_id"].cast(pl.String).to_numpy().astype(str), return_inverse=True)

    # Replace frames by their ranks among all starts and ends: same order, same
    # ties, and small enough that shot * span + rank cannot overflow int64.
    _, ranks = np.unique(np.concatenate([starts, ends]), return_inverse=True)
    span = 2 * n + 1
    start_keys = shots.astype(np.int64) * span + ranks[:n]
    end_keys = shots.astype(np.int64) * span + ranks[n:]

    # Sorted by key, the partners of track k after it are k+1 .. upper-1.
    order = np.argsort(start_keys, kind="stable")
    upper = np.searchsorted(start_keys[order], end_keys[order], side="right")
    counts = np.maximum(upper - np.arange(n) - 1, 0)
    first = np.repeat(np.arange(n), counts)
    run_start = np.repeat(np.cumsum(counts) - counts, counts)
    second = first + 1 + np.arange(len(first)) - run_start

    # Back to row indices, smaller first, in a stable order.
    a, b = order[first], order[second]
    pairs = np.column_stack([np.minimum(a, b), np.maximum(a, b)]).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def positions_on_screen_together(tracks: pl.DataFrame, track_ids: np.ndarray) -> np.ndarray:
    """:func:`on_screen_together` as positions in ``track_ids``, an assignment's own order.

    An assignment read back from the warehouse lists its tracks in its own
    order, and may lack tracks of ``tracks`` or hold some it lacks: a pair
    counts only where both of its tracks are in both.

    Args:
        tracks: ``track_id``, ``shot_id``, ``start_frame``, ``end_frame`` per track.
        track_ids: (T,) the track ids whose positions the pairs give.

    Returns:
        (P, 2) int64 positions in ``track_ids``.
    """
    position = {int(t): i for i, t in enumerate(np.asarray(track_ids).tolist())}
    ids = tracks["track_id"].to_numpy()[on_screen_together(tracks)].tolist()
    return np.array(
        [[position[a], position[b]] for a, b in ids if a in position and b in position], dtype=np.int64
    ).reshape(-1, 2)
