"""Stable cluster ids across re-clusterings of one movie."""

from __future__ import annotations

import numpy as np
import pytest

from vcn.identities import UNKNOWN, stable_cluster_ids


def test_first_clustering_numbers_clusters_by_size():
    labels = np.array([5, 7, 7, UNKNOWN, 7, 5, 9])
    ids = stable_cluster_ids(np.arange(7), labels)
    assert ids.tolist() == [1, 0, 0, UNKNOWN, 0, 1, 2]


def test_ties_in_size_go_to_the_cluster_of_the_earlier_track():
    assert stable_cluster_ids(np.arange(4), np.array([3, 1, 3, 1])).tolist() == [0, 1, 0, 1]


def test_matching_clusters_keep_their_ids_whatever_the_new_numbering():
    tracks = np.array([10, 11, 12, 13, 14, 15])
    previous = {10: 4, 11: 4, 12: 4, 13: 2, 14: 2}  # 15 was Unknown
    labels = np.array([0, 0, 1, 1, 1, 1])  # the new clustering numbers them the other way round
    ids = stable_cluster_ids(tracks, labels, previous)
    assert ids.tolist() == [4, 4, 2, 2, 2, 2]


def test_a_split_keeps_the_id_for_the_larger_overlap_and_gets_a_fresh_one():
    tracks = np.arange(6)
    previous = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    labels = np.array([0, 0, 0, 1, 2, 2])  # cluster 0 lost track 3 to a new cluster
    ids = stable_cluster_ids(tracks, labels, previous)
    assert ids.tolist() == [0, 0, 0, 2, 1, 1]  # fresh ids start above every id used before


def test_a_merge_takes_one_id_and_the_other_is_never_reused_for_someone_else():
    tracks = np.arange(6)
    previous = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2}
    labels = np.array([0, 0, 0, 0, 1, 2])  # 0 and 1 merged; track 5 is someone new
    ids = stable_cluster_ids(tracks, labels, previous)
    assert ids[:4].tolist() in ([0] * 4, [1] * 4)
    assert ids[4] == 2 and ids[5] == 3


def test_no_overlap_means_fresh_ids():
    ids = stable_cluster_ids(np.array([7, 8]), np.array([0, 1]), {1: 0, 2: 3})
    assert ids.tolist() == [4, 5]


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="one label per track"):
        stable_cluster_ids(np.arange(3), np.array([0, 1]))
