"""Average linkage under cannot-link constraints, cut at the movie's own different-person distances."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from vcn.clustering.dissimilarity import CosineDissimilarity, Factors
from vcn.clustering.linkage import (
    GROUP_QUANTILE,
    GROUP_SIZE,
    MIN_NEGATIVES,
    NEGATIVE_QUANTILE,
    UNKNOWN,
    attach_to_clusters,
    average_linkage,
    cluster_by_negative_cut,
    negative_cut,
    same_person_reach,
    track_points,
)


def _points(d: np.ndarray) -> Factors:
    """A (T, T) dissimilarity matrix as the linkage's bilinear points: d(a, b) = (D[a, b] + D[b, a]) / 2."""
    d = np.asarray(d, dtype=np.float64)
    return Factors(u=np.eye(len(d)), v=d, offset=0.0)


def _closest_pair_first(
    d: np.ndarray, cut: float, cannot_link: np.ndarray, group_cut: float | None = None
) -> np.ndarray:
    """Reference: merge the closest admissible pair of clusters (mean over item pairs) until none is within cut;
    with ``group_cut``, a closest pair of two clusters of GROUP_SIZE+ items at group_cut or farther is refused
    for good instead."""
    clusters = [[i] for i in range(len(d))]
    apart = {frozenset(p) for p in cannot_link.tolist()}
    refused: set[frozenset] = set()
    while True:
        best = None
        for x in range(len(clusters)):
            for y in range(x + 1, len(clusters)):
                if any(frozenset((a, b)) in apart for a in clusters[x] for b in clusters[y]):
                    continue
                if frozenset((tuple(clusters[x]), tuple(clusters[y]))) in refused:
                    continue
                mean = d[np.ix_(clusters[x], clusters[y])].mean()
                if mean < cut and (best is None or mean < best[0]):
                    best = (mean, x, y)
        if best is None:
            break
        mean, x, y = best
        if group_cut is not None and mean >= group_cut and min(len(clusters[x]), len(clusters[y])) >= GROUP_SIZE:
            refused.add(frozenset((tuple(clusters[x]), tuple(clusters[y]))))
            # A refused pair stays refused when either grows: the pair is remembered by its items.
            apart |= {frozenset((a, b)) for a in clusters[x] for b in clusters[y]}
            continue
        clusters[x] += clusters.pop(y)
    labels = np.empty(len(d), dtype=np.int64)
    for k, members in enumerate(clusters):
        labels[members] = k
    return labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool((a[:, None] == a[None, :]).tolist() == (b[:, None] == b[None, :]).tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_constraints_it_is_scipys_average_linkage(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 8))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - unit @ unit.T
    np.fill_diagonal(d, 0)
    z = hierarchy.linkage(squareform(d, checks=False), "average")
    heights = np.sort(z[:, 2])
    for k in (5, 20, 40):
        cut = float((heights[k] + heights[k + 1]) / 2)  # between two merge heights: no tie at the cut
        ours = average_linkage(_points(d), cut)
        theirs = hierarchy.fcluster(z, cut, "distance")
        assert _same_partition(ours, theirs)
        assert ours.max() + 1 == len(np.unique(theirs))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_with_constraints_it_merges_as_closest_pair_first(seed):
    # The nearest-neighbour chain makes the merges of merging the closest admissible pair first.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4)) + np.repeat(rng.normal(scale=3, size=(5, 4)), 8, axis=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - unit @ unit.T
    pairs = rng.choice(40, size=(25, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    for cut in (0.05, 0.2, 0.6):
        ours = average_linkage(_points(d), cut, cannot_link=pairs)
        assert _same_partition(ours, _closest_pair_first(d, cut, pairs))
        for a, b in pairs:
            assert ours[a] != ours[b]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_with_a_group_cut_it_merges_as_closest_pair_first(seed):
    # Groups of items around 4 centres, two of them close: the group cut refuses pairs of large clusters.
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2, size=(4, 4))
    centres[1] = centres[0] + rng.normal(scale=0.6, size=4)
    x = np.repeat(centres, 2 * GROUP_SIZE, axis=0) + rng.normal(size=(8 * GROUP_SIZE, 4))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - unit @ unit.T
    pairs = rng.choice(len(d), size=(10, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    for cut, group_cut in ((0.6, 0.2), (0.9, 0.4), (0.9, 0.05)):
        ours = average_linkage(_points(d), cut, cannot_link=pairs, group_cut=group_cut)
        assert _same_partition(ours, _closest_pair_first(d, cut, pairs, group_cut))
    # A group cut at the cut changes nothing.
    assert _same_partition(average_linkage(_points(d), 0.6, group_cut=0.6), average_linkage(_points(d), 0.6))


def test_two_look_alike_people_of_many_tracks_stay_apart():
    # Two people 0.5 apart, each many tracks 0.2 from their centre, never on screen together; a third far off.
    rng = np.random.default_rng(5)
    people = np.repeat(np.arange(3), 2 * GROUP_SIZE)
    d = np.where(people[:, None] == people[None, :], 0.2, 0.9) + rng.uniform(-0.02, 0.02, (len(people),) * 2)
    d[np.ix_(people == 0, people == 1)] = d[np.ix_(people == 1, people == 0)] = 0.5
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    merged = average_linkage(_points(d), 0.6)
    assert merged[people == 0][0] == merged[people == 1][0]  # the quartile cut alone joins them in full
    apart = average_linkage(_points(d), 0.6, group_cut=0.4)
    assert _same_partition(apart, people)


def test_the_group_cut_is_a_lower_quantile_of_the_same_pairs():
    x, crop_track, person, pairs = _cast()
    cosine = CosineDissimilarity()
    result = _cosine_cut(x, crop_track, person, pairs)
    points = track_points(cosine.factors(x), crop_track, np.arange(len(person)), cosine.representative)
    assert negative_cut(points, pairs, GROUP_QUANTILE) <= negative_cut(points, pairs)
    assert result.group_cut == min(result.cut, negative_cut(points, pairs, GROUP_QUANTILE))
    assert result.cut == min(negative_cut(points, pairs), same_person_reach(points, pairs))
    assert GROUP_QUANTILE < NEGATIVE_QUANTILE
    off = _cosine_cut(x, crop_track, person, pairs, group=False)
    assert off.group_cut is None and off.same_person_reach is None and off.cut == negative_cut(points, pairs)


def test_ties_close_the_chain():
    # Every pair equally far: the chain must still close (a tie goes back along the chain), one cluster.
    d = np.full((6, 6), 0.5)
    np.fill_diagonal(d, 0)
    assert average_linkage(_points(d), 1.0).tolist() == [0] * 6
    assert average_linkage(_points(d), 0.5).tolist() == list(range(6))


def test_cannot_link_holds_for_whole_clusters():
    # Two tight pairs close to each other; 0 and 2 are on screen together, so {0,1} and {2,3} never merge.
    d = np.array([[0, 0.1, 0.3, 0.3], [0.1, 0, 0.3, 0.3], [0.3, 0.3, 0, 0.1], [0.3, 0.3, 0.1, 0]])
    free = average_linkage(_points(d), 1.0)
    assert len(set(free.tolist())) == 1
    held = average_linkage(_points(d), 1.0, cannot_link=np.array([[0, 2]]))
    assert held[0] == held[1] and held[2] == held[3] and held[0] != held[2]


def test_labels_by_size_and_excluded_items_unknown():
    d = np.full((5, 5), 0.9)
    d[np.ix_([2, 3, 4], [2, 3, 4])] = 0.1
    np.fill_diagonal(d, 0)
    labels = average_linkage(_points(d), 0.5, exclude=np.array([False, False, False, False, True]))
    assert labels.tolist() == [1, 2, 0, 0, UNKNOWN]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one shape"):
        average_linkage(_points(np.zeros((3, 2))), 0.5)
    with pytest.raises(ValueError, match="finite"):
        average_linkage(_points(np.full((2, 2), np.nan)), 0.5)
    with pytest.raises(ValueError, match="outside"):
        average_linkage(_points(np.zeros((2, 2))), 0.5, cannot_link=np.array([[0, 2]]))
    with pytest.raises(ValueError, match="exclude"):
        average_linkage(_points(np.zeros((2, 2))), 0.5, exclude=np.zeros(3, dtype=bool))


def test_negative_cut_is_the_quantile_of_a_normal_fitted_to_the_distinct_pairs():
    rng = np.random.default_rng(0)
    d = rng.uniform(size=(30, 30))
    d = (d + d.T) / 2
    pairs = np.stack([np.arange(0, 28, 2), np.arange(1, 29, 2)], axis=1)
    doubled = np.concatenate([pairs, pairs[:, ::-1], pairs[:1]])  # both orders and a repeat, each counted once
    values = d[pairs[:, 0], pairs[:, 1]]
    # z(0.25) = -0.6745: the lower quartile of a normal with the pairs' mean and (sample) standard deviation.
    assert negative_cut(_points(d), doubled) == pytest.approx(values.mean() - 0.67449 * values.std(ddof=1), abs=1e-4)
    assert negative_cut(_points(d), doubled, GROUP_QUANTILE) < negative_cut(_points(d), doubled)
    assert negative_cut(_points(d), pairs[: MIN_NEGATIVES - 1]) is None
    assert negative_cut(_points(d), None) is None


def test_a_long_lower_tail_of_pairs_on_screen_together_lowers_the_cut():
    # 40 pairs about 0.8 apart; then 4 of them replaced by look-alikes 0.45 apart. The order statistic at the
    # quartile (the 10th smallest) barely moves; the fitted cut falls, holding apart pairs as close as those.
    rng = np.random.default_rng(1)
    values = np.sort(rng.normal(0.8, 0.03, 40))
    d = np.zeros((80, 80))
    pairs = np.stack([np.arange(0, 80, 2), np.arange(1, 80, 2)], axis=1)
    d[pairs[:, 0], pairs[:, 1]] = d[pairs[:, 1], pairs[:, 0]] = values
    plain = negative_cut(_points(d), pairs)
    d[pairs[:4, 0], pairs[:4, 1]] = d[pairs[:4, 1], pairs[:4, 0]] = 0.45
    tailed = negative_cut(_points(d), pairs)
    assert plain == pytest.approx(0.8 - 0.6745 * 0.03, abs=0.02)
    assert tailed < plain - 0.05
    assert np.sort(d[pairs[:, 0], pairs[:, 1]])[9] > plain - 0.01  # the order statistic would have stayed


def _cast(seed: int = 0, people: int = 6, tracks_per_person: int = 12, crops: int = 5):
    """Unit crop embeddings of tracks of ``people`` people, and pairs of tracks on screen together."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 32))
    person = np.repeat(np.arange(people), tracks_per_person)
    tracks = centres[person] + rng.normal(scale=0.35, size=(len(person), 32))
    crop_track = np.repeat(np.arange(len(person)), crops)
    x = tracks[crop_track] + rng.normal(scale=0.05, size=(len(crop_track), 32))
    # Shots of two people: each track shares one with a track of each of the next three people, so that
    # every two people are on screen together somewhere (as a TV episode's main cast).
    a = np.arange(len(person))
    pairs = [np.stack([a, (a + k * tracks_per_person) % len(person)], axis=1) for k in (1, 2, 3)]
    return x, crop_track, person, np.concatenate(pairs)


def _cosine_cut(x, crop_track, person, pairs, **options):
    """The cast clustered by cosine under the negative cut (all tracks, no attachment)."""
    cosine = CosineDissimilarity()
    return cluster_by_negative_cut(
        cosine.factors(x), crop_track, len(person), cannot_link=pairs, exclude=None,
        representatives=cosine.representative, **options,
    )


def test_a_cast_is_recovered_from_its_own_negatives():
    x, crop_track, person, pairs = _cast()
    result = _cosine_cut(x, crop_track, person, pairs)
    assert result is not None and result.rule == "negative-cut"
    assert _same_partition(result.labels, person)
    assert result.n_clusters == 6


def test_the_cut_follows_the_scale_of_the_dissimilarity():
    """A dissimilarity in other units (here cosine x 7 + 3) gives the same clusters: the cut is in its units."""
    x, crop_track, person, pairs = _cast(seed=1)
    cosine = CosineDissimilarity()
    f = cosine.factors(x)
    scaled = Factors(u=7.0 * f.u, v=f.v, offset=7.0 * f.offset + 3.0)

    def scaled_representative(mean_u, mean_v):
        direction, minus = cosine.representative(mean_u, mean_v)
        return 7.0 * direction, minus

    def run(factors, representatives):
        return cluster_by_negative_cut(
            factors, crop_track, len(person), cannot_link=pairs, exclude=None, representatives=representatives
        )

    plain, other = run(f, cosine.representative), run(scaled, scaled_representative)
    assert other.cut == pytest.approx(7.0 * plain.cut + 3.0, rel=1e-5)
    assert np.array_equal(plain.labels, other.labels)


def test_too_few_tracks_on_screen_together_give_no_cut():
    x, crop_track, person, pairs = _cast()
    cosine = CosineDissimilarity()
    result = cluster_by_negative_cut(
        cosine.factors(x), crop_track, len(person), cannot_link=pairs[: MIN_NEGATIVES - 1], exclude=None,
        representatives=cosine.representative,
    )
    assert result is None


def test_excluded_tracks_and_tracks_without_crops_are_unknown():
    x, crop_track, person, pairs = _cast()
    cosine = CosineDissimilarity()
    keep = crop_track != 3  # track 3 has no crops
    exclude = np.zeros(len(person), dtype=bool)
    exclude[5] = True
    result = cluster_by_negative_cut(
        cosine.factors(x[keep]), crop_track[keep], len(person), cannot_link=pairs, exclude=exclude,
        representatives=cosine.representative,
    )
    assert result.labels[3] == UNKNOWN and result.labels[5] == UNKNOWN
    assert (result.labels[np.setdiff1d(np.arange(len(person)), [3, 5])] >= 0).all()


def test_low_quality_tracks_join_the_cluster_they_are_within_the_cut_of():
    x, crop_track, person, pairs = _cast()
    cosine = CosineDissimilarity()
    # Track 40 (person 3) is low quality but like its person; track 41 is low quality and nobody's face.
    x = x.copy()
    x[crop_track == 41] = np.random.default_rng(5).normal(size=(int((crop_track == 41).sum()), 32)) * 3
    low = np.zeros(len(person), dtype=bool)
    low[[40, 41]] = True
    screened = cluster_by_negative_cut(
        cosine.factors(x), crop_track, len(person), cannot_link=pairs, exclude=low,
        representatives=cosine.representative,
    )
    joined = cluster_by_negative_cut(
        cosine.factors(x), crop_track, len(person), cannot_link=pairs, exclude=None, attach=low,
        representatives=cosine.representative,
    )
    # The same cut and clusters; 40 joins its person, 41 stays out.
    assert joined.cut == screened.cut and joined.n_clusters == screened.n_clusters == 6
    assert joined.labels[40] == joined.labels[np.flatnonzero(person == 3)[0]]
    assert joined.labels[41] == UNKNOWN and joined.attached == 1
    others = np.setdiff1d(np.arange(len(person)), [40, 41])
    assert np.array_equal(joined.labels[others], screened.labels[others])


def test_an_attached_track_never_bridges_two_clusters_nor_breaks_cannot_link():
    # One dimension, squared distances: clusters {0, 1} and {2, 3}, and track 4 between them.
    points = np.array([0.0, 0.1, 0.7, 0.8, 0.38])
    factors = Factors(u=np.column_stack([points**2, np.ones(5), -2 * points]),
                      v=np.column_stack([np.ones(5), points**2, points]), offset=0.0)  # (a - b)^2

    def representatives(mean_u, mean_v):
        return mean_u, mean_v

    labels = np.array([0, 0, 1, 1, UNKNOWN])
    crop_track = np.arange(5)
    none = np.zeros((0, 2), dtype=np.int64)
    # Mean distances from track 4: 0.111 to {0, 1}, 0.139 to {2, 3}.
    assert attach_to_clusters(factors, crop_track, labels, np.array([4]), 0.2, none, representatives)[4] == 0
    # The clusters themselves are untouched: 4 joins one, it does not merge them.
    out = attach_to_clusters(factors, crop_track, labels, np.array([4]), 0.2, none, representatives)
    assert out[:4].tolist() == [0, 0, 1, 1]
    # Beyond the cut it stays Unknown; on screen with track 1, it goes to the other cluster.
    assert attach_to_clusters(factors, crop_track, labels, np.array([4]), 0.1, none, representatives)[4] == UNKNOWN
    assert attach_to_clusters(factors, crop_track, labels, np.array([4]), 0.2, np.array([[1, 4]]), representatives)[4] == 1


def test_two_tracks_on_screen_together_never_join_one_cluster():
    points = np.array([0.0, 0.1, 0.6, 0.05, 0.06])
    factors = Factors(u=np.column_stack([points**2, np.ones(5), -2 * points]),
                      v=np.column_stack([np.ones(5), points**2, points]), offset=0.0)
    labels = np.array([0, 0, 1, UNKNOWN, UNKNOWN])
    out = attach_to_clusters(
        factors, np.arange(5), labels, np.array([3, 4]), 0.5, np.array([[3, 4]]), lambda u, v: (u, v)
    )
    # Both are nearest cluster 0; the nearer one (3) joins it, and 4 takes the next cluster within the cut.
    assert out[3] == 0 and out[4] == 1


def test_same_person_reach_is_the_same_person_component_and_four_of_its_deviations():
    rng = np.random.default_rng(2)
    person = np.repeat(np.arange(6), 10)
    same = person[:, None] == person[None, :]
    d = np.where(same, rng.normal(0.3, 0.04, same.shape), rng.normal(0.9, 0.04, same.shape))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    upper = np.triu(np.ones_like(same), 1)
    different = np.argwhere(upper & ~same)
    negatives = different[rng.choice(len(different), 40, replace=False)]
    reach = same_person_reach(_points(d), negatives)
    within = d[upper & same]
    assert reach == pytest.approx(within.mean() + 4 * within.std(), abs=0.01)
    assert within.max() < reach < d[upper & ~same].min()
    assert same_person_reach(_points(d), negatives[: MIN_NEGATIVES - 1]) is None
    assert same_person_reach(_points(d), None) is None


def test_two_minor_characters_stay_apart_where_the_movie_holds_each_person_close():
    # Three main characters, 10 tracks each, on screen together and 0.95 apart; two minor characters of 3
    # tracks each, 0.7 apart and never on screen; every person's tracks 0.2 apart. The quartile of the pairs on
    # screen together (about 0.95) would join the minor two; the same-person reach (about 0.25) holds them apart.
    rng = np.random.default_rng(3)
    person = np.repeat(np.arange(5), [10, 10, 10, 3, 3])
    same = person[:, None] == person[None, :]
    d = np.where(same, 0.2, 0.95) + rng.uniform(-0.02, 0.02, same.shape)
    d[np.ix_(person == 3, person == 4)] = 0.7
    d[np.ix_(person == 4, person == 3)] = 0.7
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    mains = np.flatnonzero(person < 3)
    pairs = np.array([(a, b) for a in mains for b in mains if a < b and person[a] != person[b]])[::7]

    def run(group: bool):
        return cluster_by_negative_cut(
            _points(d), np.arange(len(person)), len(person), cannot_link=pairs, exclude=None,
            representatives=lambda u, v: (u, v), group=group,
        )

    held = run(True)
    assert held.same_person_reach == pytest.approx(0.2 + 4 * 0.0082, abs=0.03)
    assert held.cut == held.same_person_reach < negative_cut(_points(d), pairs)
    assert _same_partition(held.labels, person)
    loose = run(False)
    assert loose.same_person_reach is None
    assert loose.labels[person == 3][0] == loose.labels[person == 4][0]
