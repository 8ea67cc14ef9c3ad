"""benchmarks/cut_mechanism.py counts what it says on a hand-made episode."""

from __future__ import annotations

import numpy as np

from benchmarks.cut_mechanism import merges, person_pairs


def test_person_pairs_below_the_cut_and_who_shares_the_screen():
    labels = np.array(["a", "a", "b", "b", "c"])
    d = np.array([
        [0.0, 0.2, 0.5, 0.7, 0.9],
        [0.2, 0.0, 0.5, 0.5, 0.9],
        [0.5, 0.5, 0.0, 0.3, 0.8],
        [0.7, 0.5, 0.3, 0.0, 0.8],
        [0.9, 0.9, 0.8, 0.8, 0.0],
    ])
    out = person_pairs(d, labels, np.array([[0, 4]]), cut=0.6)
    # a-b 0.55 is below the cut and never on screen together; a-c 0.9 and b-c 0.8 are above it.
    assert out == {"person_pairs": 3, "below_cut": 1, "below_cut_on_screen_together": 0, "closest_pair": 0.55,
                   "widest_person": 0.3}
    assert person_pairs(d, labels, np.array([[1, 2]]), cut=0.6)["below_cut_on_screen_together"] == 1


def test_merges_of_whole_groups_are_marked_right_or_wrong():
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1.0]])
    labels = np.repeat(np.array(["x", "y", "z"]), 6)
    points = centres[np.repeat(np.arange(3), 6)] + rng.normal(0, 0.01, (18, 3))
    out = merges(points, labels, cut=0.5)
    # x and y (cosine distance 0.2) merge below the cut: one wrong merge of two 6-track clusters.
    assert out["wrong_merges_below_cut"] == 1
    assert 0.15 < out["first_wrong_merge"] < 0.25
    assert out["right_merges_in_band_under_cut"] == 0
