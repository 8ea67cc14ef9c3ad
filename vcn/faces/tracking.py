"""Linking face detections into tracks, one shot at a time.

Deep SORT (``deep-sort-realtime``) runs inside each shot with a fresh tracker,
so a track never crosses a cut. Its appearance cue is a cheap one of our own:
a 16 x 16 grey thumbnail of the face box, mean-removed and L2-normalised.
Inside a shot that separates the few faces on screen well enough, and it costs
microseconds where a face-ID network would cost tens of milliseconds per face.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits

#: Per-track summary table written by the ``face_tracks`` stage.
TRACKS_SCHEMA = {
    "track_id": pl.Int64,
    "shot_id": pl.Int32,
    "start_frame": pl.Int64,
    "end_frame": pl.Int64,
    "start_s": pl.Float64,
    "end_s": pl.Float64,
    "n_detections": pl.Int64,
    "mean_score": pl.Float32,
    "median_face_height": pl.Float32,
}

THUMB_SIDE = 16


@dataclass(frozen=True)
class TrackerConfig:
    """Deep SORT settings, counted in detection samples (not video frames).

    Attributes:
        max_age_s: A track survives this long without a matching detection
            (occlusion, a missed detection) before it is closed.
        n_init: Consecutive matches before a track is confirmed; before that it
            matches by IoU only and dies at its first miss.
        max_iou_distance: Gate on 1 - IoU for the IoU matching stage.
        max_cosine_distance: Gate on the appearance distance of thumbnails.
        min_track_detections: Tracks with fewer detections are dropped as
            detector noise (their detections keep ``track_id`` null).

    Fragments that Deep SORT leaves of one face are stitched afterwards
    (:func:`stitch_fragments`) under the same gates: ``max_age_s`` between
    detections and an IoU of at least ``1 - max_iou_distance`` at each handover.
    """

    max_age_s: float = 1.0
    n_init: int = 2
    max_iou_distance: float = 0.7
    max_cosine_distance: float = 0.4
    min_track_detections: int = 2


def appearance_thumbnail(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The tracker's appearance vector for one face: a normalised grey thumbnail."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = np.round(box).astype(int)
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(w, max(x2, x1 + 1)), min(h, max(y2, y1 + 1))
    patch = image[y1:y2, x1:x2]
    if patch.size == 0:
        return np.full(THUMB_SIDE * THUMB_SIDE, 1.0 / THUMB_SIDE, np.float32)
    grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(grey, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    if norm < 1e-6:
        return np.full(THUMB_SIDE * THUMB_SIDE, 1.0 / THUMB_SIDE, np.float32)
    return thumb / norm


class ShotTracker:
    """Tracks faces inside one shot; create a new one at every cut.

    Args:
        config: Tracker settings.
        samples_per_s: Detection sampling rate, to turn ``max_age_s`` into samples.
    """

    def __init__(self, config: TrackerConfig, samples_per_s: float) -> None:
        from deep_sort_realtime.deepsort_tracker import DeepSort

        self._tracker = DeepSort(
            max_age=max(1, int(round(config.max_age_s * samples_per_s))),
            n_init=config.n_init,
            max_iou_distance=config.max_iou_distance,
            max_cosine_distance=config.max_cosine_distance,
            nn_budget=32,
            embedder=None,
        )

    def update(self, boxes: np.ndarray, scores: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Feeds one sampled frame; returns the local track id of each detection (-1 if none)."""
        assigned = np.full(len(boxes), -1, dtype=np.int64)
        raw = [
            ([float(b[0]), float(b[1]), float(max(b[2] - b[0], 1e-3)), float(max(b[3] - b[1], 1e-3))], float(s), "face")
            for b, s in zip(boxes, scores)
        ]
        tracks = self._tracker.update_tracks(raw, embeds=list(features), others=list(range(len(boxes))))
        for track in tracks:
            if track.time_since_update == 0 and track.get_det_supplementary() is not None:
                assigned[int(track.get_det_supplementary())] = int(track.track_id)
        return assigned


def track_detections(
    detections: pl.DataFrame,
    features: np.ndarray,
    samples_per_s: float,
    config: TrackerConfig = TrackerConfig(),
) -> pl.DataFrame:
    """Assigns a movie-wide ``track_id`` to every detection.

    Args:
        detections: The ``face_detections`` table (needs ``frame``, ``shot_id``,
            box and ``score`` columns), any row order.
        features: (N, D) appearance vectors aligned with ``detections`` rows.
        samples_per_s: Detection sampling rate of the movie.
        config: Tracker settings.

    Returns:
        ``detections`` sorted by frame with an Int64 ``track_id`` column; null for
        detections in tracks shorter than ``config.min_track_detections``.
        Track ids are dense, numbered in order of first appearance.
    """
    if len(features) != detections.height:
        raise ValueError(f"{len(features)} feature rows for {detections.height} detections")
    order = np.lexsort((detections["detection_id"].to_numpy(), detections["frame"].to_numpy()))
    detections = detections[order]
    features = features[order]
    frames = detections["frame"].to_numpy()
    shots = detections["shot_id"].to_numpy()
    boxes = detections.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64)
    scores = detections["score"].to_numpy()

    track_of = np.full(detections.height, -1, dtype=np.int64)
    next_id = 0
    tracker: ShotTracker | None = None
    current_shot = None
    local_to_global: dict[int, int] = {}
    starts = np.flatnonzero(np.r_[True, frames[1:] != frames[:-1]]) if len(frames) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(frames)]
    # The Kalman filter's solves are 4x4: with more than one BLAS thread each call waits on the others, which
    # made tracking 3x slower on a busy 2-core machine (same tracks). The limit reaches the BLAS libraries
    # loaded when it is set: the tracker's (scipy's) are loaded first.
    import deep_sort_realtime.deepsort_tracker  # noqa: F401

    with threadpool_limits(1):
        for a, b in zip(starts, ends):
            if shots[a] != current_shot:
                current_shot = shots[a]
                tracker = ShotTracker(config, samples_per_s)
                local_to_global = {}
            local = tracker.update(boxes[a:b], scores[a:b], features[a:b])
            for i, lid in enumerate(local):
                if lid < 0:
                    continue
                if lid not in local_to_global:
                    local_to_global[lid] = next_id
                    next_id += 1
                track_of[a + i] = local_to_global[lid]

    track_of = stitch_fragments(
        track_of, shots, detections["time_s"].to_numpy(), frames, boxes,
        max_gap_s=config.max_age_s, min_iou=1.0 - config.max_iou_distance,
    )

    # Drop tracks that are too short to be anything but detector noise, then renumber densely.
    ids, counts = np.unique(track_of[track_of >= 0], return_counts=True)
    keep = set(ids[counts >= config.min_track_detections].tolist())
    dense: dict[int, int] = {}
    out = np.full(len(track_of), -1, dtype=np.int64)
    for i, t in enumerate(track_of):
        if t in keep:
            out[i] = dense.setdefault(t, len(dense))
    return detections.with_columns(
        pl.Series("track_id", out, dtype=pl.Int64).replace(-1, None)
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _handover_iou(
    a: np.ndarray, b: np.ndarray, times: np.ndarray, frames: np.ndarray, boxes: np.ndarray, max_gap_s: float
) -> float:
    """The worst IoU where the detections of tracks ``a`` and ``b`` hand over to each other; -1 if they cannot be one.

    ``a`` and ``b`` are detection indices. The tracks can be one face only when
    they never share a frame, and at every point where the merged sequence passes
    from one to the other the two detections are at most ``max_gap_s`` apart.
    """
    if np.intersect1d(frames[a], frames[b], assume_unique=False).size:
        return -1.0
    merged = np.concatenate([a, b])
    side = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
    order = np.argsort(frames[merged], kind="stable")
    merged, side = merged[order], side[order]
    switches = np.flatnonzero(side[1:] != side[:-1])
    worst = 1.0
    for k in switches:
        i, j = merged[k], merged[k + 1]
        if times[j] - times[i] > max_gap_s:
            return -1.0
        worst = min(worst, _iou(boxes[i], boxes[j]))
    return worst


def stitch_fragments(
    track_of: np.ndarray,
    shots: np.ndarray,
    times: np.ndarray,
    frames: np.ndarray,
    boxes: np.ndarray,
    max_gap_s: float,
    min_iou: float,
) -> np.ndarray:
    """Joins the tracks of one shot that are fragments of one face.

    Deep SORT sometimes opens a new track for a face while its track is still
    alive (a jump its motion model did not expect), then hands the face back:
    the face ends up as two tracks whose frame ranges interleave but that never
    share a frame. Clustering must keep tracks on screen together apart, so such
    a pair would stay split for good; a plain break (a track ending and a new
    one starting in the same place soon after) splits a person the same way.
    Two tracks of one shot are joined when they share no frame and, wherever
    one hands over to the other, the two detections are at most ``max_gap_s``
    apart with boxes overlapping by ``min_iou`` or more. The best joins go first
    (highest worst-handover IoU), one at a time.

    Args:
        track_of: (N,) track id per detection, -1 for none.
        shots: (N,) shot per detection.
        times: (N,) seconds per detection.
        frames: (N,) frame per detection.
        boxes: (N, 4) x1, y1, x2, y2 per detection.
        max_gap_s: Longest gap bridged at a handover (the tracker's ``max_age_s``).
        min_iou: Least overlap of the two boxes at a handover.

    Returns:
        (N,) track ids, the joined tracks taking the smaller id.
    """
    out = track_of.copy()
    tracked = np.flatnonzero(out >= 0)
    # The tracked rows of each shot, by one sort (a mask per shot would cost shots x detections: minutes on a film).
    tracked = tracked[np.argsort(shots[tracked], kind="stable")]
    bounds = np.flatnonzero(np.diff(shots[tracked])) + 1
    for rows in np.split(tracked, bounds) if len(tracked) else []:
        members = {int(t): rows[out[rows] == t] for t in np.unique(out[rows])}
        if len(members) < 2:
            continue

        def span(t: int) -> tuple[float, float]:
            return float(times[members[t]].min()), float(times[members[t]].max())

        def score(t: int, u: int) -> float:
            (s1, e1), (s2, e2) = span(t), span(u)
            if s2 - e1 > max_gap_s or s1 - e2 > max_gap_s:
                return -1.0
            return _handover_iou(members[t], members[u], times, frames, boxes, max_gap_s)

        ids = sorted(members)
        scores = {(t, u): score(t, u) for k, t in enumerate(ids) for u in ids[k + 1 :]}
        while True:
            best = max(scores.items(), key=lambda item: item[1], default=None)
            if best is None or best[1] < min_iou:
                break
            (keep, gone), _ = best
            members[keep] = np.sort(np.concatenate([members[keep], members.pop(gone)]))
            out[members[keep]] = keep
            scores = {pair: value for pair, value in scores.items() if gone not in pair and keep not in pair}
            for other in members:
                if other != keep:
                    scores[(min(keep, other), max(keep, other))] = score(min(keep, other), max(keep, other))
    return out


def summarise_tracks(tracked: pl.DataFrame) -> pl.DataFrame:
    """The per-track table (:data:`TRACKS_SCHEMA`) of a tracked detections table."""
    if tracked.is_empty() or tracked["track_id"].null_count() == tracked.height:
        return pl.DataFrame(schema=TRACKS_SCHEMA)
    return (
        tracked.filter(pl.col("track_id").is_not_null())
        .group_by("track_id")
        .agg(
            pl.col("shot_id").first(),
            pl.col("frame").min().alias("start_frame"),
            pl.col("frame").max().alias("end_frame"),
            pl.col("time_s").min().alias("start_s"),
            pl.col("time_s").max().alias("end_s"),
            pl.len().alias("n_detections"),
            pl.col("score").mean().alias("mean_score"),
            (pl.col("y2") - pl.col("y1")).median().alias("median_face_height"),
        )
        .sort("track_id")
        .cast(TRACKS_SCHEMA)
        .select(list(TRACKS_SCHEMA))
    )


#: Per-frame box table of :func:`boxes_every_frame` (``vcn export``'s detections.csv, ``vcn preview``).
FRAME_BOXES_SCHEMA = {
    "frame": pl.Int64,
    "track_id": pl.Int64,
    "x1": pl.Float32,
    "y1": pl.Float32,
    "x2": pl.Float32,
    "y2": pl.Float32,
    "score": pl.Float32,
    "detected": pl.Int8,
}


def boxes_every_frame(tracked: pl.DataFrame) -> pl.DataFrame:
    """A box on every frame of every track, lined up with the video frame by frame.

    The detector runs on sampled frames only. Between two detections of one track
    its box moves linearly, frame by frame; those boxes have ``detected`` 0 and no
    score. Detections that no track took are kept as they are (``track_id`` null).

    Args:
        tracked: Tracked detections (``frame``, box, ``score``, ``track_id``), any order.

    Returns:
        :data:`FRAME_BOXES_SCHEMA` rows sorted by frame, then track (untracked last).
    """
    missing = [c for c in ("frame", "x1", "y1", "x2", "y2", "score", "track_id") if c not in tracked.columns]
    if missing:
        raise ValueError(f"tracked detections lack column(s) {missing}; have {tracked.columns}")
    detected = (
        tracked.select("frame", "track_id", "x1", "y1", "x2", "y2", "score", pl.lit(1, pl.Int8).alias("detected"))
        .cast(FRAME_BOXES_SCHEMA)
    )
    with_track = detected.filter(pl.col("track_id").is_not_null()).sort("track_id", "frame")
    parts = [detected.filter(pl.col("track_id").is_null())]
    if with_track.height:
        ids = with_track["track_id"].to_numpy()
        frames = with_track["frame"].to_numpy()
        corners = with_track.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64)
        bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
        out_frames, out_ids, out_boxes = [], [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            seen = frames[a:b]
            every = np.arange(seen[0], seen[-1] + 1)
            between = every[~np.isin(every, seen)]
            if not len(between):
                continue
            out_frames.append(between)
            out_ids.append(np.full(len(between), ids[a]))
            out_boxes.append(np.column_stack([np.interp(between, seen, corners[a:b, k]) for k in range(4)]))
        if out_frames:
            boxes = np.concatenate(out_boxes)
            parts.append(
                pl.DataFrame(
                    {
                        "frame": np.concatenate(out_frames),
                        "track_id": np.concatenate(out_ids),
                        **{name: boxes[:, k] for k, name in enumerate(("x1", "y1", "x2", "y2"))},
                        "score": pl.Series([None] * len(boxes), dtype=pl.Float32),
                        "detected": np.zeros(len(boxes), np.int8),
                    }
                ).cast(FRAME_BOXES_SCHEMA)
            )
        parts.append(with_track)
    return pl.concat(parts).sort("frame", "track_id", nulls_last=True)
