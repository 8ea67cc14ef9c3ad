"""Deep SORT tracking inside shots."""

from __future__ import annotations

import numpy as np
import polars as pl

from vcn.faces.detection.video import DETECTIONS_SCHEMA, LANDMARK_COLUMNS
from vcn.faces.tracking import (
    TrackerConfig,
    appearance_thumbnail,
    stitch_fragments,
    summarise_tracks,
    track_detections,
)


def _detections(rows: list[tuple[int, int, float, float]], side: float = 60) -> pl.DataFrame:
    """Rows of (frame, shot, x1, y1) with square boxes."""
    data = {
        "detection_id": list(range(len(rows))),
        "frame": [r[0] for r in rows],
        "shot_id": [r[1] for r in rows],
        "time_s": [r[0] / 24 for r in rows],
        "x1": [r[2] for r in rows],
        "y1": [r[3] for r in rows],
        "x2": [r[2] + side for r in rows],
        "y2": [r[3] + side for r in rows],
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


def _stitch(track_of, frames, xs, shots=None, max_gap_s=1.0, min_iou=0.3):
    frames = np.asarray(frames)
    boxes = np.array([[x, 100, x + 80, 200] for x in xs], dtype=np.float64)
    shots = np.zeros(len(frames), int) if shots is None else np.asarray(shots)
    return stitch_fragments(np.asarray(track_of), shots, frames / 24, frames, boxes, max_gap_s, min_iou).tolist()


def test_interleaved_fragments_of_one_face_become_one_track():
    # The Hamilton clip's case: track 0 on 0-20, a new track 1 opened on 24-32 while 0 was alive, then 0 again.
    frames = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    xs = [200 + 3 * k for k in range(len(frames))]
    assert _stitch([0] * 6 + [1] * 3 + [0] * 2, frames, xs) == [0] * 11
    # A plain break, within the tracker's max age and in the same place, is joined too.
    assert _stitch([0] * 5 + [1] * 6, frames, xs) == [0] * 11


def test_faces_apart_on_screen_together_or_across_a_cut_are_not_joined():
    frames = [0, 4, 8, 12, 16, 20]
    # Elsewhere on the frame at the handover.
    assert _stitch([0, 0, 0, 1, 1, 1], frames, [100, 100, 100, 400, 400, 400]) == [0, 0, 0, 1, 1, 1]
    # Too long a gap (2 s at 24 fps).
    assert _stitch([0, 0, 0, 1, 1, 1], [0, 4, 8, 56, 60, 64], [100] * 6) == [0, 0, 0, 1, 1, 1]
    # Sharing a frame: two faces, however close.
    assert _stitch([0, 0, 1, 0, 1], [0, 4, 8, 8, 12], [100, 100, 110, 100, 110]) == [0, 0, 1, 0, 1]
    # Different shots.
    assert _stitch([0, 0, 1, 1], [0, 4, 8, 12], [100] * 4, shots=[0, 0, 1, 1]) == [0, 0, 1, 1]
    # Untracked detections stay untracked.
    assert _stitch([0, -1, 0], [0, 4, 8], [100] * 3) == [0, -1, 0]


def test_a_face_moving_fast_stays_one_track():
    """Through track_detections: Lin-Manuel Miranda's close-up in the Hamilton clip (frames 118-210, every 4th),
    whose jumps Deep SORT alone breaks into three tracks (boxes here 90 px square)."""
    corners = [
        (213, 37), (206, 30), (202, 27), (195, 17), (181, 17), (170, 29), (172, 14), (187, 9), (209, 21),
        (235, 35), (247, 20), (239, 21), (228, 30), (215, 37), (205, 54), (204, 40), (206, 15), (213, 19),
        (218, 16), (237, 17), (260, 30), (269, 21), (278, 21), (277, 25),
    ]
    rows = [(118 + 4 * k, 0, x, y) for k, (x, y) in enumerate(corners)]
    tracked = track_detections(_detections(rows, side=90), _features(len(rows), [0] * len(rows)), samples_per_s=7.5)
    assert tracked["track_id"].to_list() == [0] * len(rows)


def test_tracking_runs_its_kalman_solves_on_one_blas_thread(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    import vcn.faces.tracking as tracking

    seen = []
    update = tracking.ShotTracker.update

    def spy(self, *args):
        seen.append({lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return update(self, *args)

    monkeypatch.setattr(tracking.ShotTracker, "update", spy)
    rows = [(3 * k, 0, 100 + 4 * k, 100) for k in range(6)]
    with threadpool_limits(2):  # as on a machine of 2 cores or more
        track_detections(_detections(rows), _features(len(rows), [0] * len(rows)), samples_per_s=8)
        after = {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    assert seen and all(threads == 1 for frame in seen for threads in frame.values())
    assert any(frame for frame in seen)  # scipy's BLAS, which the Kalman filter calls, was loaded and limited
    assert all(threads == 2 for threads in after.values()), "the limit is lifted after tracking"
