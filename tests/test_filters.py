"""The three crop filters."""

from __future__ import annotations

import cv2
import numpy as np
import polars as pl

from vcn.faces.filters import FilterConfig, face_rank_in_frame, reject_reason, sharpness


def test_reasons_in_order():
    cfg = FilterConfig(min_face_area=100, top_k=2, min_sharpness=10)
    assert reject_reason(50, 0, 100, cfg) == "small_face"
    assert reject_reason(50, 5, 1, cfg) == "small_face"
    assert reject_reason(500, 2, 1, cfg) == "not_top_k"
    assert reject_reason(500, 1, 1, cfg) == "blurry"
    assert reject_reason(500, 1, 100, cfg) is None


def test_rank_within_frame_by_area():
    det = pl.DataFrame({"frame": [0, 0, 0, 1], "x1": [0, 0, 0, 0], "y1": [0, 0, 0, 0], "x2": [10, 30, 20, 5], "y2": [10, 30, 20, 5]})
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
