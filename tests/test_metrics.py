"""Tests of the track-level clustering metrics (vcn.clustering.metrics).

Hand-made cases carry their arithmetic in comments; NMI is checked against
scikit-learn and the pairwise and BCubed figures against naive double loops,
with Unknown tracks expanded into singleton clusters.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from vcn.clustering.metrics import (
    ClusteringScores,
    MetricsInputError,
    evaluate,
    evaluate_files,
    format_table,
)


def _tracks(true: str, pred: list[str | None]) -> tuple[dict[str, str], dict[str, str | None]]:
    """Labels and predictions for tracks t0, t1, ... from an identity string and a cluster list."""
    ids = [f"t{i}" for i in range(len(true))]
    return dict(zip(ids, true)), dict(zip(ids, pred))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- hand-made cases


def test_perfect_clustering_scores_one_everywhere():
    labels, pred = _tracks("AAB", ["1", "1", "2"])
    s = evaluate(labels, pred)
    assert (s.n_tracks, s.n_identities, s.n_clusters, s.n_unknown) == (3, 2, 2, 0)
    for value in (s.wcp, s.pcr, s.nmi, s.bcubed_precision, s.bcubed_recall, s.bcubed_f):
        assert value == pytest.approx(1.0)
    assert (s.pairwise_precision, s.pairwise_recall, s.pairwise_f) == (1.0, 1.0, 1.0)
    assert s.wcp_clustered == 1.0 and s.bcubed_f_clustered == pytest.approx(1.0)


def test_all_in_one_cluster():
    # Identities A A B B B C (sizes 2, 3, 1), one predicted cluster of 6.
    labels, pred = _tracks("AABBBC", ["x"] * 6)
    s = evaluate(labels, pred)
    assert s.wcp == pytest.approx(3 / 6)  # the majority identity B holds 3 of 6
    assert s.pcr == pytest.approx(1 / 3)
    # BCubed precision per track = |own identity in cluster| / 6:
    # 2 tracks * 2/6 + 3 * 3/6 + 1 * 1/6 = 14/6, averaged over 6 -> 14/36.
    assert s.bcubed_precision == pytest.approx(14 / 36)
    assert s.bcubed_recall == 1.0
    # Predicted pairs C(6,2) = 15, true pairs C(2,2) + C(3,2) = 4, all 4 found.
    assert s.pairwise_precision == pytest.approx(4 / 15)
    assert s.pairwise_recall == 1.0
    assert s.nmi == 0.0  # the prediction carries no information


def test_all_singletons_give_wcp_one_and_pcr_n_over_k():
    # 6 tracks of identities A A B B B C, each its own cluster.
    labels, pred = _tracks("AABBBC", [str(i) for i in range(6)])
    s = evaluate(labels, pred)
    assert s.wcp == 1.0
    assert s.pcr == pytest.approx(6 / 3)
    assert s.bcubed_precision == 1.0
    # BCubed recall per track = 1 / identity size: 2 * 1/2 + 3 * 1/3 + 1 = 3, over 6 -> 0.5.
    assert s.bcubed_recall == pytest.approx(0.5)
    # No predicted pair: precision 1.0 by convention; none of the 4 true pairs found.
    assert (s.pairwise_precision, s.pairwise_recall, s.pairwise_f) == (1.0, 0.0, 0.0)


def test_unknown_tracks_count_as_singletons_but_not_as_clusters():
    # t0..t5 with identities A A A B B C; predicted {t0,t1}=1, {t3,t5}=2, t2 and t4 Unknown.
    # Evaluated clusters: {t0,t1}(A A), {t2}(A), {t3,t5}(B C), {t4}(B).
    labels, pred = _tracks("AAABBC", ["1", "1", None, "2", None, "2"])
    pred["extra"] = "1"  # predicted but unlabelled: ignored, counted
    s = evaluate(labels, pred)
    assert (s.n_tracks, s.n_identities, s.n_clusters, s.n_unknown) == (6, 3, 2, 2)
    assert s.n_unlabelled_predictions == 1
    assert s.unknown_fraction == pytest.approx(2 / 6)
    assert s.pcr == pytest.approx(2 / 3)  # the two Unknowns are not clusters
    assert s.wcp == pytest.approx((2 + 1 + 1 + 1) / 6)
    # BCubed precision: t0,t1 -> 1, t2 -> 1, t3,t5 -> 1/2, t4 -> 1; sum 5 -> 5/6.
    # BCubed recall: t0,t1 -> 2/3, t2 -> 1/3, t3 -> 1/2, t4 -> 1/2, t5 -> 1; sum 11/3 -> 11/18.
    # F = 2 * 5/6 * 11/18 / (5/6 + 11/18) = 55/78.
    assert s.bcubed_precision == pytest.approx(5 / 6)
    assert s.bcubed_recall == pytest.approx(11 / 18)
    assert s.bcubed_f == pytest.approx(55 / 78)
    # Pairs: predicted {t0,t1}, {t3,t5}; true pairs C(3,2) + C(2,2) = 4; only {t0,t1} is right.
    assert s.pairwise_precision == pytest.approx(1 / 2)
    assert s.pairwise_recall == pytest.approx(1 / 4)
    assert s.pairwise_f == pytest.approx(1 / 3)
    # Clustered only (t0,t1,t3,t5): WCP (2 + 1) / 4; BCubed P = (1+1+1/2+1/2)/4 = 3/4,
    # R = 1 (within these tracks each identity's members share a cluster), F = 6/7.
    assert s.wcp_clustered == pytest.approx(3 / 4)
    assert s.bcubed_f_clustered == pytest.approx(6 / 7)


def test_leaving_tracks_unknown_cannot_beat_merging_them_correctly():
    labels, merged = _tracks("AAAA", ["1", "1", "1", "1"])
    _, unknown = _tracks("AAAA", ["1", None, None, None])
    good, lazy = evaluate(labels, merged), evaluate(labels, unknown)
    assert lazy.bcubed_recall < good.bcubed_recall
    assert lazy.pairwise_recall < good.pairwise_recall
    assert lazy.wcp == good.wcp == 1.0


def test_all_unknown_has_no_clustered_scores():
    labels, pred = _tracks("AB", [None, None])
    s = evaluate(labels, pred)
    assert (s.n_clusters, s.pcr, s.unknown_fraction) == (0, 0.0, 1.0)
    assert s.wcp_clustered is None and s.bcubed_f_clustered is None


def test_textbook_example_manning_ir_book_figure_16_4():
    # Manning, Raghavan & Schütze, Introduction to Information Retrieval, Fig. 16.4:
    # cluster 1 = 5 x + 1 o, cluster 2 = 1 x + 4 o + 1 d, cluster 3 = 2 x + 3 d (N = 17).
    # The book gives purity 0.71, NMI 0.36, and pair counts TP 20, FP 20, FN 24
    # (so P = 0.5, R = 20/44, F1 = 0.48).
    true = "xxxxxo" + "xooood" + "xxddd"
    pred = ["1"] * 6 + ["2"] * 6 + ["3"] * 5
    s = evaluate(*_tracks(true, pred))
    assert s.wcp == pytest.approx((5 + 4 + 3) / 17)
    assert round(s.wcp, 2) == 0.71
    assert round(s.nmi, 2) == 0.36
    assert s.pairwise_precision == pytest.approx(20 / 40)
    assert s.pairwise_recall == pytest.approx(20 / 44)
    assert round(s.pairwise_f, 2) == 0.48
    # BCubed, worked out: precision = (1/17) * [(5²+1²)/6 + (1²+4²+1²)/6 + (2²+3²)/5] = 149/255,
    # recall (identity sizes x 8, o 5, d 4) = (1/17) * [(5²+1²+2²)/8 + (1²+4²)/5 + (1²+3²)/4] = 193/340.
    assert s.bcubed_precision == pytest.approx(149 / 255)
    assert s.bcubed_recall == pytest.approx(193 / 340)


def test_single_track():
    s = evaluate({"t": "A"}, {"t": "1"})
    assert (s.wcp, s.nmi, s.bcubed_f, s.pairwise_f, s.pcr) == (1.0, 1.0, 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- against references


def _random_case(rng: np.random.Generator, n: int) -> tuple[dict[str, str], dict[str, str | None]]:
    k, m = rng.integers(1, 8), rng.integers(1, 10)
    ids = [f"{i:04d}" for i in range(n)]
    true = rng.integers(0, k, n)
    clusters = rng.integers(0, m, n)
    unknown = rng.random(n) < rng.choice([0.0, 0.2, 0.6, 1.0])
    labels = {t: f"id{y}" for t, y in zip(ids, true)}
    pred = {t: None if u else f"c{c}" for t, c, u in zip(ids, clusters, unknown)}
    return labels, pred


def _expanded(labels: dict[str, str], pred: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """True and predicted labels in track order, each Unknown as a fresh singleton cluster."""
    tracks = list(labels)
    return [labels[t] for t in tracks], [pred[t] if pred[t] is not None else f"unknown:{t}" for t in tracks]


@pytest.mark.parametrize("seed", range(40))
def test_nmi_matches_sklearn_with_unknowns_as_singletons(seed):
    rng = np.random.default_rng(seed)
    labels, pred = _random_case(rng, int(rng.integers(1, 80)))
    true, expanded = _expanded(labels, pred)
    assert evaluate(labels, pred).nmi == pytest.approx(normalized_mutual_info_score(true, expanded), abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_pairwise_and_bcubed_match_naive_loops(seed):
    rng = np.random.default_rng(1000 + seed)
    labels, pred = _random_case(rng, int(rng.integers(1, 60)))
    tracks = list(labels)

    # Pairwise: a pair is predicted positive iff both are clustered and in the same cluster.
    tp = predicted = actual = 0
    for a, b in itertools.combinations(tracks, 2):
        same_pred = pred[a] is not None and pred[a] == pred[b]
        same_true = labels[a] == labels[b]
        tp += same_pred and same_true
        predicted += same_pred
        actual += same_true
    # BCubed: per track, over its cluster (itself alone when Unknown) and its identity.
    precision = recall = 0.0
    for t in tracks:
        cluster = [u for u in tracks if pred[t] is not None and pred[u] == pred[t]] or [t]
        identity = [u for u in tracks if labels[u] == labels[t]]
        both = sum(labels[u] == labels[t] for u in cluster)
        precision += both / len(cluster)
        recall += both / len(identity)

    s = evaluate(labels, pred)
    assert s.pairwise_precision == pytest.approx(tp / predicted if predicted else 1.0)
    assert s.pairwise_recall == pytest.approx(tp / actual if actual else 1.0)
    assert s.bcubed_precision == pytest.approx(precision / len(tracks))
    assert s.bcubed_recall == pytest.approx(recall / len(tracks))
    p, r = s.pairwise_precision, s.pairwise_recall
    assert s.pairwise_f == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


def test_wcp_matches_naive_count_on_random_case():
    rng = np.random.default_rng(7)
    labels, pred = _random_case(rng, 200)
    true, expanded = _expanded(labels, pred)
    majority = 0
    for cluster in set(expanded):
        members = [y for y, c in zip(true, expanded) if c == cluster]
        majority += max(members.count(y) for y in set(members))
    assert evaluate(labels, pred).wcp == pytest.approx(majority / len(true))


def test_large_input_counts_pairs_exactly():
    # 100k tracks: identity i % 100, cluster i % 200 -> every cluster pure, each identity split in 2.
    n = 100_000
    labels = {str(i): f"id{i % 100}" for i in range(n)}
    pred = {str(i): f"c{i % 200}" for i in range(n)}
    s = evaluate(labels, pred)
    assert (s.n_identities, s.n_clusters, s.wcp, s.pcr) == (100, 200, 1.0, 2.0)
    # Each identity (1000 tracks) splits into two clusters of 500: recall C(500,2)*2 / C(1000,2).
    assert s.pairwise_recall == pytest.approx(2 * math.comb(500, 2) / math.comb(1000, 2))
    assert s.bcubed_recall == pytest.approx(0.5)


# --------------------------------------------------------------------------- evaluate() errors


def test_no_tracks_is_an_error():
    with pytest.raises(MetricsInputError, match="no labelled tracks"):
        evaluate({}, {"t": "1"})


def test_labelled_track_without_prediction_lists_ids_and_count():
    labels = {f"t{i}": "A" for i in range(8)}
    with pytest.raises(MetricsInputError) as info:
        evaluate(labels, {"t0": "1"})
    message = str(info.value)
    assert "7 of 8" in message and "'t1'" in message and "'t5'" in message
    assert "'t6'" not in message and "2 more" in message


# --------------------------------------------------------------------------- CSV input


def test_files_keep_strings_and_an_empty_cluster_is_unknown(tmp_path):
    labels = _write(tmp_path / "labels.csv", "track_id,identity,note\n007,Alice,x\n10,Bob,\n\n")
    pred = _write(tmp_path / "pred.csv", "cluster,track_id\n01,007\n,10\n 2 ,99\n")
    s = evaluate_files(labels, pred)
    assert (s.n_tracks, s.n_unknown, s.n_unlabelled_predictions) == (2, 1, 1)


def test_missing_file_names_the_file(tmp_path):
    pred = _write(tmp_path / "pred.csv", "track_id,cluster\nt1,1\n")
    with pytest.raises(MetricsInputError, match="nope.csv: file not found"):
        evaluate_files(tmp_path / "nope.csv", pred)


def test_missing_column_names_file_line_and_found_columns(tmp_path):
    labels = _write(tmp_path / "labels.csv", "track_id,identity\nt1,A\n")
    path = _write(tmp_path / "pred.csv", "track,cluster\nt1,1\n")
    with pytest.raises(MetricsInputError) as info:
        evaluate_files(labels, path)
    message = str(info.value)
    assert f"{path} line 1" in message
    assert "track_id" in message and "found columns: track, cluster" in message


def test_duplicate_track_id_names_both_lines(tmp_path):
    path = _write(tmp_path / "labels.csv", "track_id,identity\nt1,A\nt2,B\nt1,C\n")
    with pytest.raises(MetricsInputError, match=r"labels\.csv line 4: duplicate track_id 't1' \(first on line 2\)"):
        evaluate_files(path, path)


def test_empty_track_id_and_empty_identity_are_errors(tmp_path):
    path = _write(tmp_path / "labels.csv", "track_id,identity\nt1,A\n,B\n")
    with pytest.raises(MetricsInputError, match=r"labels\.csv line 3: empty track_id"):
        evaluate_files(path, path)
    path = _write(tmp_path / "labels.csv", "track_id,identity\nt1,A\nt2,\n")
    with pytest.raises(MetricsInputError, match=r"labels\.csv line 3: empty identity"):
        evaluate_files(path, path)


def test_short_row_is_an_error(tmp_path):
    labels = _write(tmp_path / "labels.csv", "track_id,identity\nt1,A\n")
    path = _write(tmp_path / "pred.csv", "track_id,cluster\nt1,1\nt2\n")
    with pytest.raises(MetricsInputError, match=r"pred\.csv line 3: expected 2 fields, got 1"):
        evaluate_files(labels, path)


def test_labelled_track_without_prediction_row_names_files_and_lines(tmp_path):
    labels = _write(tmp_path / "labels.csv", "track_id,identity\nt1,A\nt2,A\nt3,B\n")
    pred = _write(tmp_path / "pred.csv", "track_id,cluster\nt1,1\n")
    with pytest.raises(MetricsInputError) as info:
        evaluate_files(labels, pred)
    message = str(info.value)
    assert message.startswith(f"{pred}: ")
    assert "2 of 3" in message
    assert f"'t2' ({labels} line 3)" in message and f"'t3' ({labels} line 4)" in message


def test_errors_are_value_errors(tmp_path):
    assert issubclass(MetricsInputError, ValueError)


# --------------------------------------------------------------------------- output


def test_to_dict_and_table():
    labels, pred = _tracks("AAABBC", ["1", "1", None, "2", None, "2"])
    s = evaluate(labels, pred)
    d = s.to_dict()
    assert list(d) == [f.name for f in ClusteringScores.__dataclass_fields__.values()]
    assert all(v is None or type(v) in (int, float) for v in d.values())
    table = format_table(s)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # right-aligned values
    assert any(line.startswith("WCP ") and line.endswith("83.33 %") for line in lines)
    assert any(line.startswith("PCR ") and line.endswith("0.667") for line in lines)
    assert any(line.startswith("predicted clusters") and line.endswith(" 2") for line in lines)
