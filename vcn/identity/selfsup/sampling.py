"""A bounded, even sample of a movie's crops: every track keeps some, long tracks give up the most.

Finetuning, its view bank and the loss metric hold per-crop data (decoded chips,
trunk features of augmented views, K head logits) whose size grows with the
movie. To keep their memory bounded on a feature film they work on at most a
fixed number of crops, picked by :func:`spread_crops`: each track keeps
``min(its crops, k)`` crops spread evenly over it, with ``k`` the largest cap
that fits. Short tracks (most of a movie's tracks) thus keep all their crops and
the long tracks of the lead actors, whose crops are the most alike, give up
some. The choice depends only on the crops' tracks, so it is deterministic.
"""

from __future__ import annotations

import numpy as np


def spread_crops(crop_track: np.ndarray, max_crops: int) -> np.ndarray:
    """At most ``max_crops`` crops, the same share of every track, each track's spread evenly over it.

    Every crop is kept when they fit. Otherwise every track keeps
    ``min(its crops, k)`` of them, evenly spaced in the order given (a track's
    first and last crop included), with ``k`` the largest cap that fits. When
    even one crop per track does not fit (more tracks than ``max_crops``), the
    ``max_crops`` tracks with the most crops keep one each, their middle crop
    (ties by first appearance).

    Args:
        crop_track: (N,) track of each crop (any integer labels).
        max_crops: Most crops to keep, >= 1.

    Returns:
        Sorted indices into ``crop_track``.

    Raises:
        ValueError: If ``max_crops`` < 1 or ``crop_track`` is not 1-d.
    """
    crop_track = np.asarray(crop_track)
    if isinstance(max_crops, bool) or int(max_crops) != max_crops or max_crops < 1:
        raise ValueError(f"max_crops must be a positive int, got {max_crops!r}")
    if crop_track.ndim != 1:
        raise ValueError(f"crop_track must be a 1-d array, got shape {crop_track.shape}")
    if len(crop_track) <= max_crops:
        return np.arange(len(crop_track))
    _, first, inverse, counts = np.unique(crop_track, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # crops grouped by track, in their order within each
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if len(counts) > max_crops:
        # Not one crop per track fits: the longest tracks keep their middle crop.
        tracks = np.lexsort((first, -counts))[:max_crops]
        return np.sort(order[starts[tracks] + (counts[tracks] - 1) // 2])
    low, high = 1, int(counts.max())  # the largest cap k with sum(min(count, k)) <= max_crops
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(counts, middle).sum() <= max_crops:
            low = middle
        else:
            high = middle - 1
    keep = []
    for start, count in zip(starts.tolist(), counts.tolist()):
        positions = np.unique(np.round(np.linspace(0, count - 1, min(count, low))).astype(np.int64))
        keep.append(order[start + positions])
    return np.sort(np.concatenate(keep))
