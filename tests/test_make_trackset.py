"""The validation-episode generator's multi-photo tracks (benchmarks/make_trackset.py --views)."""

from __future__ import annotations

import cv2
import numpy as np

from benchmarks.make_trackset import CROP, _render_track, _view_segments


def test_a_track_shows_one_photo_per_four_crops_up_to_the_most_asked():
    for n, views in ((3, 1), (7, 1), (8, 2), (15, 3), (16, 4), (40, 4)):
        segment = _view_segments(n, 4)
        assert len(segment) == n and int(segment.max()) + 1 == views, (n, segment)
        assert (np.diff(segment) >= 0).all() and (np.diff(segment) <= 1).all()  # consecutive segments
        assert np.bincount(segment).min() >= min(n, 4)
    assert _view_segments(40, 1).tolist() == [0] * 40  # one photo: the generator's default
    assert int(_view_segments(40, 2).max()) == 1


def test_each_segment_renders_its_own_photo():
    rng = np.random.default_rng(0)
    dark, light = np.full((256, 256, 3), 40, np.uint8), np.full((256, 256, 3), 210, np.uint8)
    segment = _view_segments(8, 4)
    crops = [cv2.imdecode(c, cv2.IMREAD_COLOR) for c in _render_track([dark, light], 8, rng, segment)]
    assert all(c.shape == (CROP, CROP, 3) for c in crops)
    means = np.array([c.mean() for c in crops])
    assert means[segment == 0].max() < means[segment == 1].min()
    # One photo, as before the option: the same draws give the same crops.
    a = _render_track(dark, 5, np.random.default_rng(1))
    b = _render_track([dark], 5, np.random.default_rng(1), np.zeros(5, dtype=np.int64))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
