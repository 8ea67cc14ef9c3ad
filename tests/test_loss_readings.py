"""The loss metric's track-excess reading (benchmarks/loss_readings.py) is the form it claims to be."""

from __future__ import annotations

import numpy as np

from benchmarks.adaptation_check import closer_shares
from benchmarks.loss_readings import TrackExcessLoss, track_distances
from vcn.identity.selfsup.loss_metric import LossDissimilarity, LossSample


def _sample(seed: int = 0, crops: int = 12, k: int = 32) -> tuple[LossSample, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(crops, k)).astype(np.float32)
    crop_track = np.repeat(np.arange(4), 3)
    metric = LossDissimilarity(rng.normal(size=k) * 0.1, 0.1, 0.04)
    return LossSample(np.arange(crops), logits, metric, "test", "cpu"), crop_track


def test_track_excess_is_the_cross_loss_less_the_tracks_own():
    sample, crop_track = _sample()
    metric = sample.metric
    excess = TrackExcessLoss(metric.center, metric.student_temperature, metric.teacher_temperature)
    crop = metric.factors(sample.logits)
    pair = crop.between(np.arange(len(crop_track)), np.arange(len(crop_track)))  # every crop pair's symmetric loss
    mean = np.array([[pair[np.ix_(crop_track == a, crop_track == b)].mean() for b in range(4)] for a in range(4)])
    expected = mean - 0.5 * (np.diag(mean)[:, None] + np.diag(mean)[None, :])
    got = track_distances(excess, sample, crop_track, 4)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-10)
    # As the method states it: the mean pair loss itself.
    np.testing.assert_allclose(track_distances(metric, sample, crop_track, 4), mean, atol=1e-10)


def test_mechanism_counts_pairs_closer_than_the_negative_quantiles():
    labels = np.array(["a", "a", "b", "b"])
    d = np.array([[0, 1, 5, 6], [1, 0, 7, 8], [5, 7, 0, 2], [6, 8, 2, 0]], dtype=float)
    out = closer_shares(d, labels, np.array([[0, 2], [1, 3], [0, 3], [1, 2]]), np.ones(4, dtype=bool))
    # Negatives 5, 6, 7, 8, every different-person pair: only 5 is below their 5, 10 and 25 % quantiles.
    assert out["fmr"] == [0.25, 0.25, 0.25]
    assert out["tar"] == [1.0, 1.0, 1.0]  # both same-person pairs (1 and 2) are closer than 5.15
