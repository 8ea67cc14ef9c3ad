"""The benchmark's baseline clusterings."""

from __future__ import annotations

import dlib
import numpy as np
import pytest
from scipy.cluster import hierarchy
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import adjusted_rand_score

from benchmarks import baselines
from benchmarks.baselines import (
    BASELINES,
    agglomerative,
    agglomerative_k,
    chinese_whispers,
    dbscan,
    finch,
    finch_first,
    finch_last,
    hdbscan,
)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def five_people() -> tuple[np.ndarray, np.ndarray]:
    """5 random directions in 128-d, 12 tracks each: same person ~0.16 apart, different ~1.4."""
    rng = np.random.default_rng(0)
    centres = unit_rows(rng.normal(size=(5, 128)))
    truth = np.repeat(np.arange(5), 12)
    rng.shuffle(truth)
    x = unit_rows(centres[truth] + rng.normal(scale=0.01, size=(len(truth), 128)))
    return x.astype(np.float32), truth


def angles(*degrees: float) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    "method",
    [chinese_whispers, agglomerative, dbscan, hdbscan, lambda x: agglomerative_k(x, 5)],
    ids=["chinese_whispers", "agglomerative", "dbscan", "hdbscan", "agglomerative_k"],
)
def test_recovers_well_separated_people(five_people, method):
    x, truth = five_people
    labels = method(x)
    assert labels.shape == truth.shape and labels.dtype == np.int64
    assert adjusted_rand_score(truth, labels) == 1.0
    assert labels[0] == 0 and set(labels.tolist()) == set(range(5))


def test_finch_first_partition_never_mixes_people(five_people):
    # FINCH over-segments: a person's tracks may split, but no cluster spans two people.
    x, truth = five_people
    first = finch_first(x)
    assert int(first.max()) + 1 >= 5
    assert np.unique(np.stack([first, truth]), axis=1).shape[1] == int(first.max()) + 1


def test_finch_recovers_people_seen_in_two_shots():
    # 5 people x 2 shots x 3 tracks: tracks of a shot ~0.05 apart, shots of a person ~0.3,
    # people ~1.4. Three points always form one first-neighbour component, so the first
    # partition is the shots, and each shot's nearest shot is the same person's other shot.
    rng = np.random.default_rng(7)
    people = unit_rows(rng.normal(size=(5, 128)))
    shots = unit_rows(np.repeat(people, 2, axis=0) + rng.normal(scale=0.02, size=(10, 128)))
    shot = np.repeat(np.arange(10), 3)
    x = unit_rows(shots[shot] + rng.normal(scale=0.003, size=(30, 128))).astype(np.float32)
    partitions = finch(x)
    assert adjusted_rand_score(shot, partitions[0]) == 1.0
    assert adjusted_rand_score(shot // 2, partitions[1]) == 1.0
    assert [int(p.max()) + 1 for p in partitions][:2] == [10, 5]


def test_registry_runs_every_baseline(five_people):
    x, truth = five_people
    assert [b.name for b in BASELINES] == [
        "Chinese Whispers (0.5)",
        "Agglomerative average (0.6)",
        "DBSCAN (eps 0.5)",
        "HDBSCAN (min size 2)",
        "FINCH first partition",
        "FINCH last partition",
        "Agglomerative at true k (uses ground truth)",
    ]
    assert [b.uses_ground_truth for b in BASELINES] == [False] * 6 + [True]
    for name, description, _, run in BASELINES:
        assert description
        labels = run(x, 5)
        assert labels.shape == truth.shape, name
    assert adjusted_rand_score(truth, BASELINES[-1].run(x, 5)) == 1.0


def test_dbscan_marks_sparse_points_as_noise(five_people):
    x, truth = five_people
    lonely = unit_rows(np.random.default_rng(1).normal(size=(2, 128))).astype(np.float32)
    labels = dbscan(np.vstack([x, lonely]))
    assert labels[-2:].tolist() == [-1, -1]
    assert adjusted_rand_score(truth, labels[:-2]) == 1.0


def test_chinese_whispers_is_dlibs_own_clustering():
    # Points at mixed distances so the threshold graph has chains, not just clean cliques.
    rng = np.random.default_rng(2)
    centres = unit_rows(rng.normal(size=(8, 16)))
    x = unit_rows(centres[rng.integers(0, 8, 80)] + rng.normal(scale=0.12, size=(80, 16))).astype(np.float32)
    for threshold in (0.3, 0.5, 0.8):
        reference = dlib.chinese_whispers_clustering([dlib.vector(row.tolist()) for row in x.astype(np.float64)], threshold)
        assert chinese_whispers(x, threshold).tolist() == reference
    assert 1 < chinese_whispers(x, 0.5).max() + 1 < 80


def test_chinese_whispers_tiny_threshold_gives_singletons(five_people):
    x, _ = five_people
    assert chinese_whispers(x, threshold=1e-9).tolist() == list(range(len(x)))


def test_threshold_pairs_blockwise_match_pdist(monkeypatch):
    x = unit_rows(np.random.default_rng(3).normal(size=(50, 4)))
    monkeypatch.setattr(baselines, "_BLOCK", 7)
    rows, cols = baselines._threshold_pairs(x, 0.9)
    dist = squareform(pdist(x))
    i, j = np.nonzero(np.triu(dist < 0.9, k=1))
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(zip(i.tolist(), j.tolist()))


def test_agglomerative_cut_height():
    x = angles(0, 10, 30, 31)  # chord distances 0.174, 0.342 (10 -> 30), 0.017
    assert agglomerative(x, distance=0.0).tolist() == [0, 1, 2, 3]
    assert agglomerative(x, distance=0.1).tolist() == [0, 1, 2, 2]
    assert agglomerative(x, distance=0.2, linkage="single").tolist() == [0, 0, 1, 1]
    assert agglomerative(x, distance=2.0).tolist() == [0, 0, 0, 0]


def test_agglomerative_k_gives_exactly_k_even_with_ties():
    rng = np.random.default_rng(4)
    x = unit_rows(rng.normal(size=(30, 8)))
    x = np.vstack([x, x[:10]])  # duplicates: ten merges at height 0
    tree = hierarchy.linkage(x, method="average")
    for k in range(1, len(x) + 1):
        labels = agglomerative_k(x, k)
        assert sorted(set(labels.tolist())) == list(range(k))
        if k <= 30:  # above the tied merges, fcluster's maxclust cut is exact too
            assert adjusted_rand_score(hierarchy.fcluster(tree, k, criterion="maxclust"), labels) == 1.0


def naive_finch_first(x: np.ndarray) -> np.ndarray:
    """FINCH's first partition straight from the paper's adjacency (all three conditions)."""
    unit = unit_rows(x.astype(np.float64))
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    kappa = sim.argmax(axis=1)
    index = np.arange(len(x))
    adjacency = (kappa[:, None] == index[None, :]) | (kappa[None, :] == index[:, None]) | (kappa[:, None] == kappa[None, :])
    return connected_components(adjacency, directed=False)[1]


def test_finch_first_partition_matches_the_papers_adjacency(monkeypatch):
    monkeypatch.setattr(baselines, "_BLOCK", 16)
    x = np.random.default_rng(5).normal(size=(300, 12)).astype(np.float32)
    assert adjusted_rand_score(naive_finch_first(x), finch_first(x)) == 1.0


def test_finch_hierarchy_is_nested_and_coarsens():
    x = np.random.default_rng(6).normal(size=(400, 16)).astype(np.float32)
    partitions = finch(x)
    counts = [int(p.max()) + 1 for p in partitions]
    assert counts[-1] == 1 and len(partitions) >= 3
    for finer, coarser, n_finer, n_coarser in zip(partitions, partitions[1:], counts, counts[1:]):
        assert n_coarser <= n_finer // 2  # every cluster merges with at least one other
        # Each finer cluster lies inside one coarser cluster.
        pairs = np.unique(np.stack([finer, coarser]), axis=1)
        assert pairs.shape[1] == n_finer
    assert finch_last(x).tolist() == partitions[-2].tolist()


def test_finch_on_a_known_hierarchy():
    x = angles(0, 1, 10, 11, 90, 91, 100, 101)
    assert [p.tolist() for p in finch(x)] == [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 1, 1, 1, 1], [0] * 8]
    assert finch_first(x).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert finch_last(x).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # A first partition that is already one cluster is all there is.
    assert finch_last(angles(0, 1, 2)).tolist() == [0, 0, 0]


ALL = [chinese_whispers, agglomerative, dbscan, hdbscan, finch_first, finch_last, lambda x: agglomerative_k(x, 1)]


@pytest.mark.parametrize("method", ALL)
def test_single_point_is_one_cluster(method):
    assert method(np.ones((1, 128), dtype=np.float32) / np.sqrt(128)).tolist() == [0]
    assert [p.tolist() for p in finch(np.ones((1, 3)))] == [[0]]


@pytest.mark.parametrize("method", ALL + [finch])
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((0, 128)), "at least one row"),
        (np.zeros((3, 0)), "at least one row"),
        (np.ones((3, 2), dtype=np.int64), "floating-point"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "non-finite"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "non-finite"),
    ],
)
def test_invalid_embeddings_are_rejected(method, bad, message):
    with pytest.raises(ValueError, match=message):
        method(bad)


def test_invalid_parameters_are_rejected(five_people):
    x, _ = five_people
    with pytest.raises(ValueError, match="threshold"):
        chinese_whispers(x, threshold=0.0)
    with pytest.raises(ValueError, match="distance"):
        agglomerative(x, distance=-1.0)
    with pytest.raises(ValueError, match="linkage"):
        agglomerative(x, linkage="mean")
    for k in (0, len(x) + 1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            agglomerative_k(x, k)
    with pytest.raises(ValueError):
        dbscan(x, eps=-0.5)
    with pytest.raises(ValueError):
        hdbscan(x, min_cluster_size=0)
