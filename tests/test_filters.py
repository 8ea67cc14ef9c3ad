"""The three crop filters, judged against the movie, and a track's best crops."""

from __future__ import annotations

import cv2
import numpy as np
import polars as pl
import pytest

from vcn.faces.filters import (
    BEST_CROPS_KEPT,
    MIN_FACE_HEIGHT,
    MIN_SHARPNESS,
    SAFE_FACE_HEIGHT,
    SAFE_SHARPNESS,
    FilterConfig,
    face_rank_in_frame,
    judge_crops,
    movie_cut,
    movie_cuts,
    reject_reason,
    sharpness,
    track_reject_reason,
)


def _crops(tracks, heights, sharps, ranks=None, unalignable=()) -> pl.DataFrame:
    """A movie's crops: one row per (track, face height, sharpness)."""
    n = len(tracks)
    return pl.DataFrame(
        {
            "track_id": list(tracks),
            "face_area": [float(h) ** 2 for h in heights],
            "frame_rank": list(ranks) if ranks is not None else [0] * n,
            "sharpness": [float(s) for s in sharps],
            "reject_reason": ["unalignable" if i in unalignable else None for i in range(n)],
        },
        schema_overrides={"reject_reason": pl.String, "frame_rank": pl.Int32},
    )


def test_reasons_in_order():
    assert reject_reason(5, 0, 100, top_k=2, min_height=10, min_sharp=10) == "small_face"
    assert reject_reason(5, 5, 1, top_k=2, min_height=10, min_sharp=10) == "small_face"
    assert reject_reason(50, 2, 1, top_k=2, min_height=10, min_sharp=10) == "not_top_k"
    assert reject_reason(50, 1, 1, top_k=2, min_height=10, min_sharp=10) == "blurry"
    assert reject_reason(50, 1, 100, top_k=2, min_height=10, min_sharp=10) is None


def test_rank_within_frame_by_area():
    det = pl.DataFrame(
        {"frame": [0, 0, 0, 1], "x1": [0, 0, 0, 0], "y1": [0, 0, 0, 0], "x2": [10, 30, 20, 5], "y2": [10, 30, 20, 5]}
    )
    assert face_rank_in_frame(det).to_list() == [2, 0, 1, 0]


def test_sharpness_drops_with_blur_and_ignores_magnification():
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    sharp = cv2.resize(texture, (150, 150), interpolation=cv2.INTER_NEAREST)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 6)
    assert sharpness(blurred) < 0.2 * sharpness(sharp)
    # The same content at another chip size scores about the same.
    other = cv2.resize(sharp, (112, 112), interpolation=cv2.INTER_AREA)
    assert abs(sharpness(other) - sharpness(sharp)) < 0.25 * sharpness(sharp)


def test_movie_cut_is_the_low_side_outlier_cut_of_the_logarithm_within_its_bounds():
    values = np.array([10.0, 20.0, 40.0, 80.0, 160.0])
    logs = np.log(values)
    mad = np.median(np.abs(logs - np.median(logs)))
    assert movie_cut(values, 0.0, np.inf) == pytest.approx(np.exp(np.median(logs) - 3 * mad))
    # A scale: every value times 3 (the movie at three times the resolution) moves the cut by 3.
    assert movie_cut(3 * values, 0.0, np.inf) == pytest.approx(3 * movie_cut(values, 0.0, np.inf))
    assert movie_cut(values, 0.0, np.inf) == pytest.approx(5.0)  # 40 / 2 ** 3
    assert movie_cut(values, 6.0, 7.0) == 6.0 and movie_cut(values, 1.0, 2.0) == 2.0
    assert movie_cut(np.array([]), 5.0, 6.0) == 5.0


def test_a_soft_low_resolution_movie_keeps_its_faces():
    """Faces 22-34 px tall, sharpness 10-30: the movie's cuts keep every crop.

    The old fixed cuts (40 x 40 px, 15) fail every crop, and each track would keep only its best few.
    """
    rng = np.random.default_rng(1)
    n = 60
    heights = rng.uniform(22, 34, n)
    sharps = rng.uniform(10, 30, n)
    crops = _crops(np.repeat(np.arange(12), 5), heights, sharps)
    cuts = movie_cuts(crops)
    assert MIN_FACE_HEIGHT <= cuts.min_face_height < 22 and MIN_SHARPNESS <= cuts.min_sharpness < 10
    assert all(r is None for r in judge_crops(crops))
    old = judge_crops(crops, FilterConfig(min_face_area=1600.0, min_sharpness=15.0))
    assert sum(r is None for r in old) == 12 * BEST_CROPS_KEPT


def test_a_sharp_movie_rejects_its_outliers_but_never_a_face_the_model_fully_recognises():
    heights = [100, 110, 120, 105, 95, 115, 20, 45] + [100] * 8
    sharps = [900, 800, 1000, 850, 950, 700, 900, 900] + [900] * 7 + [30]
    crops = _crops([0] * 8 + [1] * 8, heights, sharps)
    cuts = movie_cuts(crops)
    assert cuts.min_face_height == SAFE_FACE_HEIGHT and cuts.min_sharpness == SAFE_SHARPNESS
    reasons = judge_crops(crops)
    assert reasons[6] == "small_face" and reasons[7] is None  # 45 px: identified as well as a large face
    assert reasons[15] == "blurry" and reasons[:6] == [None] * 6


def test_a_track_whose_crops_all_fail_keeps_its_best_few():
    # Track 0: a movie of large sharp faces. Track 1: a small far face, all its crops under the movie's cut
    # but above the floors: it keeps its best three, by the margin to the cuts. Track 2: under the floors.
    heights = [120] * 12 + [22, 30, 26, 28, 24] + [8, 9]
    sharps = [900] * 12 + [40, 60, 20, 50, 45] + [50, 50]
    tracks = [0] * 12 + [1] * 5 + [2] * 2
    reasons = judge_crops(_crops(tracks, heights, sharps))
    assert reasons[:12] == [None] * 12
    kept = [i for i in range(12, 17) if reasons[i] is None]
    assert len(kept) == BEST_CROPS_KEPT and kept == [13, 15, 16]  # 30, 28 and 24 px; 26 px is the blurriest
    assert all(reasons[i] == "small_face" for i in range(12, 17) if i not in kept)
    assert reasons[17:] == ["small_face", "small_face"]
    assert track_reject_reason(reasons[17:]) == "small_face" and track_reject_reason(reasons[12:17]) is None


def test_tracks_that_are_not_faces_worth_clustering_keep_nothing():
    heights = [120] * 10 + [60, 60] + [60, 60] + [60, 60]
    sharps = [900] * 10 + [900, 900] + [5, 6] + [900, 900]
    ranks = [0] * 10 + [5, 6] + [0, 0] + [0, 0]
    tracks = [0] * 10 + [1, 1] + [2, 2] + [3, 3]
    reasons = judge_crops(_crops(tracks, heights, sharps, ranks, unalignable={14, 15}))
    assert reasons[10:12] == ["not_top_k", "not_top_k"]  # a crowd's background
    assert reasons[12:14] == ["blurry", "blurry"]  # below the blur floor: identified at about chance
    assert reasons[14:] == ["unalignable", "unalignable"]
    assert [track_reject_reason(reasons[a:b]) for a, b in ((10, 12), (12, 14), (14, 16))] == [
        "not_top_k",
        "blurry",
        "unalignable",
    ]


def test_fixed_cuts_replace_the_movie_s():
    crops = _crops([0, 0, 1], [30, 50, 60], [100, 100, 10])
    assert movie_cuts(crops, FilterConfig(min_face_area=1600.0, min_sharpness=15.0)).min_face_height == 40.0
    reasons = judge_crops(crops, FilterConfig(min_face_area=1600.0, min_sharpness=15.0))
    # Track 1's only crop is blurry by the fixed cut but above the floors: it is the track's best.
    assert reasons == ["small_face", None, None]


def test_track_reject_reason_takes_the_most_frequent_then_the_first_checked():
    assert track_reject_reason(["blurry", "small_face", "blurry"]) == "blurry"
    assert track_reject_reason(["blurry", "small_face"]) == "small_face"
    assert track_reject_reason(["blurry", None]) is None
    assert track_reject_reason([]) == "no_crops"


def test_empty_movie():
    assert judge_crops(_crops([], [], [])) == []
