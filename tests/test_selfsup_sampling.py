"""Tests of the bounded crop samples: finetuning's (spread_crops, read_kept_chips of a subset,
adapt's max_crops) and the loss metric's (loss_metric_rows and sample_quality, chunked factors).

spread_crops is checked against a naive reference written independently (try every
per-track cap from the largest down); the asset paths are checked to give the same
result on a pre-sampled movie as on the whole movie, and the same result as before
on a movie under the cap.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vcn.clustering.parameter_free import cluster_movie
from vcn.faces.crops import encode_jpeg
from vcn.identity.embeddings import read_kept_chips, read_kept_crops
from vcn.identity.quality import track_quality, within_track_scatter
from vcn.identity.selfsup.adapt import MAX_CROPS, AdaptConfig, adapt
from vcn.identity.selfsup.loss import student_log_probs, teacher_targets
from vcn.identity.selfsup.loss_metric import (
    LossDissimilarity,
    loss_metric_rows,
    sample_quality,
)
from vcn.identity.selfsup.sampling import spread_crops
from vcn.identity.selfsup.trainer import TrainConfig


def _reference(crop_track: np.ndarray, max_crops: int) -> np.ndarray:
    """Naive spread_crops: the largest per-track cap k that fits, each track's crops at round(linspace)."""
    tracks = list(dict.fromkeys(crop_track.tolist()))
    members = {t: [i for i, x in enumerate(crop_track.tolist()) if x == t] for t in tracks}
    if len(crop_track) <= max_crops:
        return np.arange(len(crop_track))
    for k in range(max(len(m) for m in members.values()), 0, -1):
        if sum(min(len(m), k) for m in members.values()) <= max_crops:
            break
    keep = set()
    for m in members.values():
        for position in np.round(np.linspace(0, len(m) - 1, min(len(m), k))).astype(int):
            keep.add(m[position])
    return np.array(sorted(keep))


# --- spread_crops -------------------------------------------------------------------------------


def test_spread_crops_keeps_a_movie_that_fits():
    tracks = np.repeat(np.arange(3), [5, 2, 9])
    assert np.array_equal(spread_crops(tracks, 16), np.arange(16))
    assert np.array_equal(spread_crops(tracks, 100), np.arange(16))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_crops", [7, 20, 55])
def test_spread_crops_matches_the_reference(seed, max_crops):
    rng = np.random.default_rng(seed)
    # Tracks of very different lengths, interleaved and with arbitrary labels.
    counts = rng.integers(1, 30, 7)
    tracks = rng.permutation(np.repeat(rng.choice(1000, 7, replace=False), counts))
    kept = spread_crops(tracks, max_crops)
    assert np.array_equal(kept, _reference(tracks, max_crops))
    assert len(kept) <= max_crops and np.all(np.diff(kept) > 0)
    # Every track keeps some crops; tracks at or under the cap keep all of theirs.
    assert set(tracks[kept].tolist()) == set(tracks.tolist())
    kept_counts = {t: int((tracks[kept] == t).sum()) for t in set(tracks.tolist())}
    cap = max(kept_counts.values())
    for t, n in kept_counts.items():
        assert n == min(int((tracks == t).sum()), cap)


def test_spread_crops_is_deterministic_and_spreads_each_track():
    tracks = np.repeat(np.arange(4), [40, 3, 17, 1])
    kept = spread_crops(tracks, 20)
    assert np.array_equal(kept, spread_crops(tracks.copy(), 20))
    assert np.bincount(tracks[kept]).tolist() == [8, 3, 8, 1]
    long_track = np.flatnonzero(tracks == 0)
    assert {long_track[0], long_track[-1]} <= set(kept.tolist())  # its first and last crops
    assert np.diff(kept[tracks[kept] == 0]).max() <= 6  # and nothing between them left out in one block


def test_spread_crops_with_more_tracks_than_room_keeps_the_longest_tracks():
    tracks = np.repeat(np.arange(6), [1, 5, 2, 5, 9, 1])
    kept = spread_crops(tracks, 3)
    assert len(kept) == 3
    assert sorted(tracks[kept].tolist()) == [1, 3, 4]  # the longest, ties by first appearance
    assert kept.tolist() == [3, 10, 17]  # each its middle crop


def test_spread_crops_refuses_bad_caps():
    with pytest.raises(ValueError, match="max_crops"):
        spread_crops(np.zeros(3, int), 0)
    with pytest.raises(ValueError, match="1-d"):
        spread_crops(np.zeros((3, 2), int), 5)


def test_the_cap_is_above_the_development_episode():
    # The 20-minute development episode (~6,800 crops) must finetune on all of its crops.
    assert MAX_CROPS >= 8192 and AdaptConfig().max_crops == MAX_CROPS


# --- reading only the sampled chips ------------------------------------------------------------


def _crops_file(path, n: int = 30, seed: int = 0):
    """A small track_crops file: n crops of 5 tracks, every third rejected, 150 px chips."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 15, 15, 3), dtype=np.uint8).repeat(10, axis=1).repeat(10, axis=2)
    table = pa.table({
        "crop_id": pa.array(np.arange(100, 100 + n), pa.int64()),
        "track_id": pa.array(np.arange(n) % 5, pa.int64()),
        "rejected": pa.array(np.arange(n) % 3 == 1),
        "template": pa.array(["dlib-150"] * n),
        "image": pa.array([encode_jpeg(im, 95) for im in images], pa.binary()),
    })
    pq.write_table(table, path, row_group_size=7)
    return path


def test_read_kept_chips_of_a_subset_are_those_of_all(tmp_path):
    path = _crops_file(tmp_path / "track_crops.parquet")
    kept = read_kept_crops(path, "dlib-150")
    table, chips = read_kept_chips(path, "dlib-150")
    assert table.equals(kept) and chips.shape == (20, 150, 150, 3) and chips.dtype == np.uint8
    rows = spread_crops(kept["track_id"].to_numpy(), 9)
    part, part_chips = read_kept_chips(path, "dlib-150", rows)
    assert part.equals(kept[rows]) and np.array_equal(part_chips, chips[rows])
    empty, none = read_kept_chips(path, "dlib-150", np.zeros(0, np.int64))
    assert empty.height == 0 and len(none) == 0
    with pytest.raises(ValueError, match="sorted"):
        read_kept_chips(path, "dlib-150", np.array([3, 1]))
    with pytest.raises(ValueError, match="aligned for"):
        read_kept_crops(path, "arcface-112")


# --- adapt on a bounded sample -----------------------------------------------------------------

TINY = AdaptConfig(
    max_rounds=2,
    max_crops=12,
    train=TrainConfig(seed=0, epochs_head_only=1, epochs_joint=1, batch_size=8, pairs_per_epoch=16, out_dim=64,
                      view_bank=2, lr_backbone=1e-4),
)


def _movie_chips(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (n, 15, 15, 3), dtype=np.uint8)
    return np.ascontiguousarray(coarse.repeat(10, axis=1).repeat(10, axis=2))


def _state(result) -> dict[str, torch.Tensor]:
    return {**result.backbone.state_dict(), **{f"head.{k}": v for k, v in result.head.state_dict().items()}}


def test_adapt_trains_on_the_same_sample_whether_the_caller_cut_it_or_not(backbone):
    chips, tracks = _movie_chips(26), np.repeat(np.arange(4), [12, 2, 9, 3])
    whole = adapt(backbone, chips, tracks, 4, config=TINY)
    rows = spread_crops(tracks, TINY.max_crops)
    cut = adapt(backbone, chips[rows], tracks[rows], 4, config=TINY)
    assert whole.crops == cut.crops == len(rows) <= TINY.max_crops
    assert set(tracks[rows].tolist()) == {0, 1, 2, 3}
    a, b = _state(whole), _state(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic, and the same model


def test_adapt_under_the_cap_uses_every_crop(backbone):
    chips, tracks = _movie_chips(10), np.repeat(np.arange(3), [4, 4, 2])
    assert adapt(backbone, chips, tracks, 3, config=TINY.model_copy(update={"max_rounds": 1})).crops == 10


# --- the loss metric on a bounded sample -------------------------------------------------------


def test_chunked_factors_are_the_whole_array_factors():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (1300, 48)).astype(np.float32)  # more rows than one chunk
    center = rng.normal(0, 0.1, 48)
    factors = LossDissimilarity(center, 0.1, 0.04).factors(logits)
    z = torch.from_numpy(logits.astype(np.float64))
    assert np.array_equal(factors.u, teacher_targets(z, torch.from_numpy(center), 0.04).numpy())
    assert np.array_equal(factors.v, -student_log_probs(z, 0.1).numpy())
    bad = logits.copy()
    bad[1100, 3] = np.nan
    with pytest.raises(FloatingPointError):
        LossDissimilarity(center, 0.1, 0.04).factors(bad)


def test_loss_metric_rows_under_the_cap_are_every_crop():
    tracks = np.repeat(np.arange(5), 4)
    quality = np.linspace(0, 1, 20)
    rows = loss_metric_rows(tracks, max_crops=20)
    kept_quality = sample_quality(quality, tracks, rows)
    assert np.array_equal(rows, np.arange(20)) and kept_quality is quality


def test_loss_metric_rows_keep_every_track_and_its_quality():
    rng = np.random.default_rng(5)
    tracks = np.repeat(np.arange(8), [30, 1, 2, 17, 5, 40, 3, 2])
    quality = rng.uniform(0, 1, len(tracks))
    rows = loss_metric_rows(tracks, max_crops=24)
    kept_quality = sample_quality(quality, tracks, rows)
    assert len(rows) <= 24 and set(tracks[rows].tolist()) == set(range(8))
    np.testing.assert_allclose(track_quality(kept_quality, tracks[rows], 8), track_quality(quality, tracks, 8),
                               rtol=1e-15)
    # More tracks than the cap: one crop per track, none left out of the clustering.
    rows = loss_metric_rows(tracks, max_crops=3)
    assert np.bincount(tracks[rows]).tolist() == [1] * 8


def test_clustering_on_the_loss_metric_sample_is_unchanged_under_the_cap():
    rng = np.random.default_rng(6)
    people = rng.normal(0, 4, (3, 32))
    tracks = np.repeat(np.arange(9), 5)
    logits = people[tracks % 3] + rng.normal(0, 0.5, (len(tracks), 32))
    quality = rng.uniform(0.5, 1, len(tracks))
    metric = LossDissimilarity(np.zeros(32), 0.1, 0.04)
    # Every two tracks of different people share a shot somewhere (27 pairs): the product's default rule.
    pairs = np.array([(a, b) for a in range(9) for b in range(a + 1, 9) if a % 3 != b % 3])
    before = cluster_movie(logits, tracks, 9, cannot_link=pairs, crop_quality=quality, dissimilarity=metric)
    assert before.clustering.rule == "negative-cut" and before.labels.tolist() == [0, 1, 2] * 3
    # The sampled crops carry their tracks' mean quality, so the screen's noise floor comes from every crop's
    # own quality, as vcn.pipeline.cluster passes it.
    scatter = within_track_scatter(quality, tracks)
    rows = loss_metric_rows(tracks)
    kept_quality = sample_quality(quality, tracks, rows)
    after = cluster_movie(
        logits[rows], tracks[rows], 9, cannot_link=pairs, crop_quality=kept_quality, quality_scatter=scatter,
        dissimilarity=metric,
    )
    assert np.array_equal(before.labels, after.labels) and before.n_clusters == after.n_clusters
    # Above the cap, the same people come out of 2 crops per track.
    rows = loss_metric_rows(tracks, max_crops=18)
    kept_quality = sample_quality(quality, tracks, rows)
    capped = cluster_movie(
        logits[rows], tracks[rows], 9, cannot_link=pairs, crop_quality=kept_quality, quality_scatter=scatter,
        dissimilarity=metric,
    )
    assert len(rows) == 18 and np.array_equal(capped.low_quality, before.low_quality)
    assert np.array_equal(capped.labels, before.labels)
