"""Stable cluster ids across re-clusterings of one movie, and analysts' edits on top of them."""

from __future__ import annotations

import numpy as np
import pytest

from vcn.clustering.identities import (
    UNKNOWN,
    Edit,
    add_edit,
    apply_edits,
    cluster_table,
    stable_cluster_ids,
)


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


# --- analysts' edits ---------------------------------------------------------------

TRACKS = np.array([10, 11, 12, 13, 14, 15])
LABELS = np.array([0, 0, 1, 1, 2, UNKNOWN])


def test_name_goes_to_the_cluster_holding_most_of_the_tracks():
    labels, names, skipped = apply_edits(TRACKS, LABELS, [Edit("name", (10, 11, 12), "Ann")])
    assert labels.tolist() == LABELS.tolist() and names == {0: "Ann"} and skipped == []


def test_merge_joins_clusters_and_keeps_the_smaller_id_and_the_name():
    edits = [Edit("name", (12, 13), "Bo"), Edit("merge", (12, 13, 14))]
    labels, names, _ = apply_edits(TRACKS, LABELS, edits)
    assert labels.tolist() == [0, 0, 1, 1, 1, UNKNOWN] and names == {1: "Bo"}


def test_merge_of_tracks_on_screen_together_is_skipped_with_the_reason():
    labels, _, skipped = apply_edits(TRACKS, LABELS, [Edit("merge", (10, 12))], cannot_link=np.array([[1, 3]]))
    assert labels.tolist() == LABELS.tolist()
    assert len(skipped) == 1 and "11 and 13 are on screen together" in skipped[0]


def test_split_moves_tracks_to_a_new_cluster_and_unknown_stays_unknown():
    labels, _, skipped = apply_edits(TRACKS, LABELS, [Edit("split", (11, 15))])
    assert labels.tolist() == [0, 3, 1, 1, 2, UNKNOWN] and skipped == []
    # Splitting a whole cluster changes nothing; an edit about Unknown tracks only is skipped.
    again, _, _ = apply_edits(TRACKS, LABELS, [Edit("split", (14,))])
    assert again.tolist() == LABELS.tolist()
    _, _, skipped = apply_edits(TRACKS, LABELS, [Edit("name", (15,), "X")])
    assert skipped and "none of them is clustered" in skipped[0]


def test_edits_apply_in_order_and_names_of_vanished_clusters_drop():
    edits = [Edit("name", (14,), "Cy"), Edit("merge", (12, 14)), Edit("split", (14,))]
    labels, names, _ = apply_edits(TRACKS, LABELS, edits)
    assert labels.tolist() == [0, 0, 1, 1, 2, UNKNOWN]  # merged into 1, then split out again as 2 (max + 1)
    assert names == {1: "Cy"}  # the name followed the merge


def test_an_edit_is_checked_and_its_tracks_are_plain_ints():
    assert Edit("merge", np.array([3, 4])).tracks == (3, 4)
    with pytest.raises(ValueError, match="unknown edit action 'rename'"):
        Edit("rename", (1,), "Ann")
    with pytest.raises(ValueError, match="needs a non-empty name"):
        Edit("name", (1,), " ")


def test_a_new_edit_must_apply_but_earlier_ones_are_only_reported():
    earlier = [Edit("name", (15,), "X")]  # Unknown track: no longer applies
    labels, names, skipped = add_edit(TRACKS, LABELS, earlier, Edit("merge", (10, 12)))
    assert labels.tolist() == [0, 0, 0, 0, 2, UNKNOWN] and names == {}
    assert len(skipped) == 1 and "none of them is clustered" in skipped[0]
    with pytest.raises(ValueError, match="edit not applied: merge of clusters .* on screen together"):
        add_edit(TRACKS, LABELS, earlier, Edit("merge", (10, 12)), cannot_link=np.array([[1, 3]]))
    with pytest.raises(ValueError, match=r"no tracks \[99\] in the clustering"):
        add_edit(TRACKS, LABELS, [], Edit("split", (10, 99)))


def test_cluster_table_writes_unknown_and_unnamed_as_null():
    table = cluster_table(TRACKS, LABELS, {1: "Bo"})
    assert table.rows() == [(10, 0, None), (11, 0, None), (12, 1, "Bo"), (13, 1, "Bo"), (14, 2, None), (15, None, None)]
