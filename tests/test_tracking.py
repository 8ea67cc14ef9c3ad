"""Deep SORT tracking inside shots."""

from __future__ import annotations

import numpy as np
import polars as pl

from vcn.faces.detection.video import DETECTIONS_SCHEMA, LANDMARK_COLUMNS
from vcn.faces.tracking import (
    TrackerConfig,
    appearance_thumbnail,
    summarise_tracks,
    track_detections,
)


def _detections(rows: list[tuple[int, int, float, float]]) -> pl.DataFrame:
    """Rows of (frame, shot, x1, y1) with 60x60 boxes."""
    data = {
        "detection_id": list(range(len(rows))),
        "frame": [r[0] for r in rows],
        "shot_id": [r[1] for r in rows],
        "time_s": [r[0] / 24 for r in rows],
        "x1": [r[2] for r in rows],
        "y1": [r[3] for r in rows],
        "x2": [r[2] + 60 for r in rows],
        "y2": [r[3] + 60 for r in rows],
        "score": [0.99] * len(rows),
        **{c: [0.0] * len(rows) for c in LANDMARK_COLUMNS},
        "appearance": [b""] * len(rows),
    }
    return pl.DataFrame(data, schema=DETECTIONS_SCHEMA)


def _features(n: int, groups: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(max(groups) + 1, 256))
    feats = base[groups] + 0.05 * rng.normal(size=(n, 256))
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def test_two_faces_moving_apart_keep_their_tracks():
    rows, groups = [], []
    for k in range(10):
        f = 3 * k
        rows += [(f, 0, 100 + 4 * k, 100), (f, 0, 400 - 4 * k, 120)]
        groups += [0, 1]
    det = _detections(rows)
    tracked = track_detections(det, _features(len(rows), groups), samples_per_s=8)
    ids = tracked.sort("detection_id")["track_id"].to_list()
    assert ids[0::2] == [ids[0]] * 10 and ids[1::2] == [ids[1]] * 10 and ids[0] != ids[1]
    assert sorted(set(ids)) == [0, 1]


def test_a_track_never_crosses_a_cut():
    rows = [(3 * k, 0 if k < 5 else 1, 200, 150) for k in range(10)]
    det = _detections(rows)
    tracked = track_detections(det, _features(10, [0] * 10), samples_per_s=8)
    per_track = tracked.group_by("track_id").agg(pl.col("shot_id").n_unique())
    assert per_track.height == 2 and per_track["shot_id"].max() == 1


def test_short_tracks_are_dropped_as_noise():
    rows = [(3 * k, 0, 200, 150) for k in range(6)] + [(9, 0, 500, 300)]
    det = _detections(rows)
    tracked = track_detections(det, _features(7, [0] * 6 + [1]), samples_per_s=8, config=TrackerConfig(min_track_detections=2))
    assert tracked.filter(pl.col("detection_id") == 6)["track_id"][0] is None
    tracks = summarise_tracks(tracked)
    assert tracks.height == 1
    assert tracks.row(0, named=True)["n_detections"] == 6
    assert tracks.row(0, named=True)["start_frame"] == 0 and tracks.row(0, named=True)["end_frame"] == 15


def test_empty_input():
    det = _detections([])
    tracked = track_detections(det, np.zeros((0, 256), np.float32), samples_per_s=8)
    assert tracked.height == 0 and "track_id" in tracked.columns
    assert summarise_tracks(tracked).height == 0


def test_appearance_thumbnail_is_unit_norm_and_handles_edges():
    image = np.random.default_rng(1).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    v = appearance_thumbnail(image, np.array([10, 10, 50, 60], float))
    assert v.shape == (256,) and abs(np.linalg.norm(v) - 1) < 1e-5
    outside = appearance_thumbnail(image, np.array([200, 200, 260, 260], float))
    assert np.isfinite(outside).all()
    flat = appearance_thumbnail(np.zeros((50, 50, 3), np.uint8), np.array([0, 0, 40, 40], float))
    assert np.isfinite(flat).all()
