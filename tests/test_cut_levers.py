"""benchmarks/cut_levers.py: its levers are what they say and leave the product as it was."""

from __future__ import annotations

import numpy as np

import vcn.clustering.linkage as linkage
from benchmarks.cut_levers import best_half, lever, lower_quantile_rank, order_statistic_cut
from vcn.clustering.dissimilarity import Factors


def test_the_order_statistic_lever_reads_the_rank_the_binomial_gives():
    rng = np.random.default_rng(0)
    d = rng.uniform(size=(30, 30))
    d = (d + d.T) / 2
    points = Factors(u=np.eye(30), v=d, offset=0.0)
    pairs = np.stack([np.arange(0, 28, 2), np.arange(1, 29, 2)], axis=1)
    values = np.sort(d[pairs[:, 0], pairs[:, 1]])
    # 14 pairs: the 3rd smallest is at or below the quartile with probability P(Binomial(14, 1/4) >= 3) = 0.72,
    # the 4th with 0.48.
    assert order_statistic_cut(0.5)(points, pairs) == values[2]
    assert order_statistic_cut(0.9)(points, pairs) == values[lower_quantile_rank(14, 0.25, 0.9)] < values[2]
    assert lower_quantile_rank(10, 0.25, 0.99) == 0
    for n in (300, 3000):
        assert abs(lower_quantile_rank(n, 0.25, 0.5) / (n - 1) - 0.25) < 0.01


def test_best_half_keeps_the_better_half_of_each_track_rounded_up():
    quality = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])
    crop_track = np.array([0, 0, 0, 1, 1, 2])
    kept = best_half(quality, crop_track) == 1.0
    assert kept.tolist() == [False, True, True, True, False, True]


def test_a_lever_is_restored_after_its_clustering():
    plain = linkage.negative_cut
    data = {"labels": np.array(["a", "b"]), "crop_track": np.array([0, 1]), "cannot_link": np.zeros((0, 2), int),
            "pretrained": np.eye(2, 4), "quality": np.ones(2)}
    with lever("order statistic, confidence 0.75", data, "pretrained", "quality"):
        assert linkage.negative_cut is not plain
    assert linkage.negative_cut is plain
