"""Tests of the learned loss metric and of the progressive adaptation rounds.

The loss metric is checked against :func:`vcn.identity.selfsup.loss.symmetric_loss` on random
logits and inside the clustering on synthetic logits. The rounds run the real dlib
backbone on CPU on 4 tracks x 6 smooth random chips, K = 256, two rounds of one
head-only and one joint step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vcn.clustering.parameter_free import cluster_movie
from vcn.identity.selfsup.adapt import AdaptConfig, AdaptResult, _jaccard, adapt
from vcn.identity.selfsup.head import ProjectionHead
from vcn.identity.selfsup.loss import symmetric_loss
from vcn.clustering.linkage import MIN_NEGATIVES, track_points
from vcn.identity.selfsup.loss_metric import LossDissimilarity, LossDivergence, LossSample, crop_logits
from vcn.identity.selfsup.matching import TrackMatches
from vcn.identity.selfsup.trainer import TrainConfig

# --- the loss metric ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperatures", [(0.1, 0.04), (0.2, 0.07)])
def test_factors_reproduce_symmetric_loss(temperatures):
    tau_s, tau_t = temperatures
    rng = np.random.default_rng(1)
    logits = rng.uniform(-1, 1, (13, 40))
    center = rng.normal(0, 0.1, 40)
    metric = LossDissimilarity(center, tau_s, tau_t)
    factors = metric.factors(logits)
    assert factors.offset == 0.0
    z = torch.from_numpy(logits)
    expected = symmetric_loss(z, z, z, z, torch.from_numpy(center), tau_s, tau_t).numpy()
    all_crops = np.arange(13)
    np.testing.assert_allclose(factors.between(all_crops, all_crops), expected, rtol=1e-12, atol=1e-12)
    # A subset against another subset: the same entries.
    a, b = np.array([0, 4, 7]), np.array([1, 2, 12, 5])
    np.testing.assert_allclose(factors.between(a, b), expected[np.ix_(a, b)], rtol=1e-12, atol=1e-12)


def test_factors_are_targets_and_negative_log_probs():
    logits = np.random.default_rng(2).uniform(-1, 1, (5, 8))
    factors = LossDissimilarity(np.zeros(8), 0.1, 0.04).factors(logits)
    np.testing.assert_allclose(factors.u.sum(axis=1), 1.0, rtol=1e-12)
    assert (factors.u >= 0).all() and (factors.v > 0).all()
    np.testing.assert_allclose(np.exp(-factors.v).sum(axis=1), 1.0, rtol=1e-12)


def test_representative_is_the_mean_factors():
    metric = LossDissimilarity(np.zeros(3), 0.1, 0.04)
    u, v = np.ones((2, 3)), np.full((2, 3), 2.0)
    out_u, out_v = metric.representative(u, v)
    assert out_u is u and out_v is v


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="center"):
        LossDissimilarity(np.zeros((2, 2)), 0.1, 0.04)
    with pytest.raises(ValueError, match="teacher_temperature"):
        LossDissimilarity(np.zeros(4), 0.1, 0.0)
    metric = LossDissimilarity(np.zeros(4), 0.1, 0.04)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        metric.factors(np.zeros((3, 5)))
    with pytest.raises(FloatingPointError):
        metric.factors(np.array([[0.0, np.nan, 0.0, 0.0]]))


def test_cluster_movie_with_the_loss_separates_two_groups():
    # Two people, 4 tracks of 5 crops each; logits in [-1, 1] like the head's (cosines).
    rng = np.random.default_rng(3)
    k = 64
    people = rng.uniform(-1, 0.3, (2, k))
    people[0, :4] = 1.0
    people[1, 4:8] = 1.0
    track_person = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    crop_track = np.repeat(np.arange(8), 5)
    logits = np.clip(people[track_person[crop_track]] + rng.normal(0, 0.03, (40, k)), -1, 1)
    metric = LossDivergence(logits.mean(axis=0), 0.1, 0.04)
    result = cluster_movie(logits, crop_track, 8, dissimilarity=metric)
    assert result.dissimilarity == "loss"
    assert result.n_clusters == 2
    assert len(set(result.labels[track_person == 0])) == 1
    assert len(set(result.labels[track_person == 1])) == 1
    # Cannot-link between two tracks of one person keeps them apart.
    linked = cluster_movie(logits, crop_track, 8, dissimilarity=metric, cannot_link=np.array([[0, 2]]))
    assert linked.labels[0] != linked.labels[2]


def test_divergence_between_two_crops_is_half_the_symmetrised_kl_of_their_predictions():
    rng = np.random.default_rng(7)
    logits = rng.uniform(-1, 1, (6, 20))
    metric = LossDivergence(np.zeros(20), 0.1, 0.04)
    points = track_points(metric.factors(logits), np.arange(6), np.arange(6), metric.representative)
    got = points.between(np.arange(6), np.arange(6))
    log_p = torch.log_softmax(torch.from_numpy(logits) / 0.1, dim=-1).numpy()
    p = np.exp(log_p)
    expected = 0.5 * ((p[:, None] - p[None]) * (log_p[:, None] - log_p[None])).sum(axis=-1)
    np.testing.assert_allclose(got, expected, atol=1e-5)  # representatives are float32
    assert (got[~np.eye(6, dtype=bool)] > 0).all()
    np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-5)


def test_divergence_between_sets_is_their_mean_pair_loss_less_their_own():
    rng = np.random.default_rng(8)
    logits = rng.uniform(-1, 1, (12, 16))
    crop_track = np.repeat(np.arange(3), 4)
    center = rng.normal(0, 0.1, 16)
    metric = LossDivergence(center, 0.1, 0.04)
    # The pair loss at the student's temperature for both roles: the training loss with tau_t = tau_s.
    pair = LossDissimilarity(center, 0.1, 0.1).factors(logits).between(np.arange(12), np.arange(12))
    mean = np.array([[pair[np.ix_(crop_track == a, crop_track == b)].mean() for b in range(3)] for a in range(3)])
    expected = mean - 0.5 * (np.diag(mean)[:, None] + np.diag(mean)[None, :])
    points = track_points(metric.factors(logits), crop_track, np.arange(3), metric.representative)
    np.testing.assert_allclose(points.between(np.arange(3), np.arange(3)), expected, atol=1e-5)
    # The paper's form: the loss as written, at the temperatures the model trained with.
    paper = metric.paper_form()
    assert type(paper) is LossDissimilarity and paper.name == "loss-as-written"
    assert (paper.student_temperature, paper.teacher_temperature) == (0.1, 0.04)
    assert paper.paper_form() is paper


def test_without_a_negative_cut_the_adaptive_thresholds_compare_the_loss_as_written():
    rng = np.random.default_rng(9)
    k = 48
    people = rng.uniform(-1, 0.3, (3, k))
    for i in range(3):
        people[i, 4 * i : 4 * i + 4] = 1.0
    track_person = np.arange(9) % 3
    crop_track = np.repeat(np.arange(9), 4)
    logits = np.clip(people[track_person[crop_track]] + rng.normal(0, 0.05, (36, k)), -1, 1)
    metric = LossDivergence(logits.mean(axis=0), 0.1, 0.04)
    few = np.array([[0, 1], [3, 5]])  # fewer than MIN_NEGATIVES pairs on screen together: no cut
    assert len(few) < MIN_NEGATIVES
    assert metric.group_cut is False and metric.paper_form().group_cut is False
    result = cluster_movie(logits, crop_track, 9, dissimilarity=metric, cannot_link=few)
    written = cluster_movie(logits, crop_track, 9, dissimilarity=metric.paper_form(), cannot_link=few)
    assert result.clustering.rule == written.clustering.rule == "adaptive-threshold"
    assert result.labels.tolist() == written.labels.tolist()
    assert result.dissimilarity == "loss" and written.dissimilarity == "loss-as-written"


def test_a_saved_loss_sample_reads_back_as_the_divergence(tmp_path):
    rng = np.random.default_rng(10)
    sample = LossSample(np.arange(3), rng.normal(size=(3, 8)).astype(np.float32),
                        LossDivergence(rng.normal(size=8), 0.1, 0.04), "m-1", "cpu")
    sample.save(tmp_path / "s.npz")
    back = LossSample.load(tmp_path / "s.npz")
    assert type(back.metric) is LossDivergence
    np.testing.assert_array_equal(back.metric.center, sample.metric.center)
    assert (back.metric.student_temperature, back.metric.teacher_temperature) == (0.1, 0.04)
    np.testing.assert_array_equal(back.logits, sample.logits)


def test_crop_logits_runs_the_student_in_eval_mode():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.BatchNorm1d(8))
    head = ProjectionHead(8, hidden_dim=16, bottleneck_dim=8, out_dim=32)
    backbone.train()
    chips = np.random.default_rng(4).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    out = crop_logits(backbone, head, lambda x: x / 255.0, chips, "cpu", batch_size=2)
    assert out.shape == (5, 32) and out.dtype == np.float32
    assert backbone.training and head.training  # modes restored
    backbone.eval()
    with torch.no_grad():
        x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0
        expected = head(backbone(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# --- the rounds -----------------------------------------------------------------------------------

CONFIG = AdaptConfig(
    max_rounds=2,
    pca_dim=4,
    train=TrainConfig(
        seed=5, epochs_head_only=1, epochs_joint=1, batch_size=16, pairs_per_epoch=16, out_dim=256,
        trainable="last_stage", lr_backbone=1e-4,
    ),
)
LABELS = np.array([0, 0, 1, 1])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Smooth random "faces": two people, two tracks each; a crop is its person's
    # coarse image plus a little noise, upsampled to the dlib chip size.
    people = rng.integers(40, 216, (2, 15, 15, 3)).astype(np.int16)
    person = np.repeat(LABELS, 6)
    coarse = np.clip(people[person] + rng.integers(-20, 21, (24, 15, 15, 3)), 0, 255).astype(np.uint8)
    chips = np.repeat(np.repeat(coarse, 10, axis=1), 10, axis=2)
    return np.ascontiguousarray(chips), np.repeat(np.arange(4), 6)


@pytest.fixture(scope="module")
def runs(backbone, data) -> tuple[AdaptResult, AdaptResult, list]:
    chips, tracks = data
    seen: list = []
    with_labels = adapt(
        backbone, chips, tracks, 4, config=CONFIG, labels=LABELS, progress=lambda *args: seen.append(args)
    )
    without = adapt(backbone, chips, tracks, 4, config=CONFIG)
    return with_labels, without, seen


def _same_model(a: AdaptResult, b: AdaptResult) -> None:
    for (name, x), y in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for (name, x), y in zip(a.head.state_dict().items(), b.head.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(a.center, b.center)
    assert [r.loss_curve for r in a.rounds] == [r.loss_curve for r in b.rounds]
    assert [r.n_matches for r in a.rounds] == [r.n_matches for r in b.rounds]
    assert a.stopped == b.stopped


def test_rounds_run_and_are_recorded(runs):
    result, _, seen = runs
    assert 1 <= len(result.rounds) <= 2
    assert result.stopped in ("stable", "max_rounds")
    for r in result.rounds:
        assert len(r.loss_curve) == 2 and all(math.isfinite(v) and v > 0 for v in r.loss_curve)
        assert r.seconds > 0 and r.pairs_per_second > 0
    assert result.rounds[0].n_matches == 0 and result.rounds[0].match_precision is None
    assert result.pairs_per_second > 0
    assert [(n, e, m) for n, e, m, _ in seen] == [(n, e, 2) for n in range(1, len(result.rounds) + 1) for e in (0, 1)]
    assert result.center.shape == (256,)
    assert result.final.config.seed == CONFIG.train.seed + len(result.rounds) - 1


def test_two_people_are_matched_and_trained_on(runs):
    # The two tracks of each person match after round 1, so round 2 trains on them.
    result, _, _ = runs
    assert len(result.rounds) == 2
    second = result.rounds[1]
    assert second.n_matches == 2 and second.match_precision == 1.0
    assert result.matches.pairs.tolist() == [[0, 1], [2, 3]]


def test_same_seed_same_result_and_labels_only_change_the_diagnostics(runs):
    # Two calls with one seed, one with labels: the same model, rounds and matches.
    with_labels, without, _ = runs
    _same_model(with_labels, without)
    np.testing.assert_array_equal(with_labels.matches.pairs, without.matches.pairs)
    assert all(r.match_precision is None for r in without.rounds)
    assert with_labels.rounds[1].match_precision is not None


def test_callers_backbone_is_untouched(runs, backbone):
    result, _, _ = runs
    assert result.backbone is not backbone.module
    assert any(p.requires_grad for p in backbone.module.parameters())


def test_cannot_link_keeps_pairs_out_of_the_matches(backbone, data):
    chips, tracks = data
    result = adapt(backbone, chips, tracks, 4, config=CONFIG, cannot_link=np.array([[0, 1], [2, 3]]))
    # The two true pairs are forbidden and nothing else matches: no new pairs, so the rounds stop.
    assert result.matches is not None and len(result.matches) == 0
    assert len(result.rounds) == 1 and result.stopped == "stable"


def test_one_round_seeks_no_matches(backbone, data):
    chips, tracks = data
    result = adapt(backbone, chips, tracks, 4, config=CONFIG.model_copy(update={"max_rounds": 1}))
    assert len(result.rounds) == 1 and result.matches is None and result.stopped == "max_rounds"


def test_jaccard_of_match_sets():
    def matches(*pairs):
        return TrackMatches(pairs=np.array(pairs, dtype=np.int64).reshape(-1, 2), n_tracks=5, thresholds=np.zeros(5))

    assert _jaccard(None, matches()) == 1.0
    assert _jaccard(matches((0, 1)), matches((0, 1))) == 1.0
    assert _jaccard(matches((0, 1)), matches((0, 1), (2, 3))) == 0.5
    assert _jaccard(None, matches((0, 1))) == 0.0


def test_labels_of_the_wrong_length_are_refused(backbone, data):
    chips, tracks = data
    with pytest.raises(ValueError, match="one identity per track"):
        adapt(backbone, chips, tracks, 4, config=CONFIG, labels=[0, 1])
