"""The parameter-free track clustering, its dissimilarities and the quality screen."""

from __future__ import annotations

import numpy as np
import pytest

from vcn.clustering.dissimilarity import CosineDissimilarity, Factors
from vcn.clustering.parameter_free import UNKNOWN, cluster_movie, cluster_tracks
from vcn.identity.quality import embed_and_score, low_quality_tracks, track_quality, within_track_scatter


def _movie(rng: np.random.Generator, people: int = 4, tracks_per_person: int = 6, crops: int = 8, dim: int = 32,
           track_noise: float = 0.01, crop_noise: float = 0.05):
    """Synthetic crops: people far apart, tracks scattered around their person, crops around their track."""
    centres = rng.normal(size=(people, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    person = np.repeat(np.arange(people), tracks_per_person)
    track_centres = centres[person] + rng.normal(scale=track_noise, size=(len(person), dim))
    crop_track = np.repeat(np.arange(len(person)), crops)
    x = track_centres[crop_track] + rng.normal(scale=crop_noise, size=(len(crop_track), dim))
    return x.astype(np.float32), crop_track, person


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all(len(set(b[a == k])) == 1 for k in set(a)) and all(len(set(a[b == k])) == 1 for k in set(b))


def test_cosine_factors_give_mean_pair_dissimilarity() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    f = CosineDissimilarity().factors(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    naive = np.array([[1.0 - unit[i] @ unit[j] for j in range(7)] for i in range(7)])
    np.testing.assert_allclose(f.between(np.arange(7), np.arange(7)), naive, atol=1e-12)
    # The mean over all pairs of two sets is the bilinear form of their mean factors.
    a, b = np.array([0, 1, 2]), np.array([3, 4, 5, 6])
    mean_pairs = naive[np.ix_(a, b)].mean()
    via_means = f.offset + 0.5 * (f.u[a].mean(0) @ f.v[b].mean(0) + f.u[b].mean(0) @ f.v[a].mean(0))
    assert via_means == pytest.approx(mean_pairs, abs=1e-12)


def test_factors_refuse_bad_shapes_and_non_finite() -> None:
    with pytest.raises(ValueError, match="one shape"):
        Factors(u=np.zeros((3, 2)), v=np.zeros((3, 3)), offset=0.0)
    with pytest.raises(ValueError, match="finite"):
        Factors(u=np.full((2, 2), np.nan), v=np.zeros((2, 2)), offset=0.0)


def test_recovers_well_separated_people_without_being_told_how_many() -> None:
    rng = np.random.default_rng(1)
    for people in (2, 4, 7):
        x, crop_track, person = _movie(rng, people=people)
        result = cluster_movie(x, crop_track, len(person))
        assert result.n_clusters == people
        assert _same_partition(result.labels, person)
        assert result.n_unknown == 0


def _naive_clustering(x: np.ndarray, crop_track: np.ndarray, n_tracks: int, cannot_link: list[tuple[int, int]]):
    """The merge rule written out with loops over crops, as the method states it.

    theta of a cluster: mean of 1 - cos over all pairs of its crops from different tracks
    (a single track: over all pairs of its crops); S(A, B): 1 - cos
    between the clusters' mean crop directions; a match is S < theta_A or S < theta_B
    between clusters without a cannot-link pair; pairs of clusters that are each
    other's closest match merge; repeat until nothing matches.
    """
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    clusters = [[t] for t in range(n_tracks)]

    def crops(cluster):
        return [i for i in range(len(x)) if crop_track[i] in cluster]

    def theta(cluster):
        c = crops(cluster)
        if len(cluster) == 1:
            pairs = [1 - unit[i] @ unit[j] for i in c for j in c if i != j]
        else:
            pairs = [1 - unit[i] @ unit[j] for i in c for j in c if crop_track[i] != crop_track[j]]
        return sum(pairs) / len(pairs) if pairs else -np.inf

    def distance(a, b):
        ca, cb = unit[crops(a)].mean(0), unit[crops(b)].mean(0)
        return 1 - ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb)

    while True:
        k = len(clusters)
        thetas = [theta(c) for c in clusters]
        best = []
        for a in range(k):
            options = [
                (distance(clusters[a], clusters[b]), b) for b in range(k)
                if b != a
                and not any((i, j) in cannot_link or (j, i) in cannot_link for i in clusters[a] for j in clusters[b])
                and distance(clusters[a], clusters[b]) < max(thetas[a], thetas[b])
            ]
            best.append(min(options)[1] if options else None)
        merges = [(a, b) for a, b in enumerate(best) if b is not None and best[b] == a and a < b]
        if not merges:
            break
        gone = {b for _, b in merges}
        for a, b in merges:
            clusters[a] = clusters[a] + clusters[b]
        clusters = [c for i, c in enumerate(clusters) if i not in gone]
    labels = np.empty(n_tracks, dtype=np.int64)
    for label, cluster in enumerate(clusters):
        labels[cluster] = label
    return labels


def test_matches_the_rule_written_out_with_loops() -> None:
    """Same partition as the naive rule on overlapping people, tracks of very different lengths."""
    rng = np.random.default_rng(5)
    for _ in range(4):
        people, tracks = 3, 14
        centres = rng.normal(size=(people, 6))
        person = rng.integers(people, size=tracks)
        lengths = rng.integers(1, 9, size=tracks)
        crop_track = np.repeat(np.arange(tracks), lengths)
        track_centres = centres[person] + rng.normal(scale=0.6, size=(tracks, 6))
        x = track_centres[crop_track] + rng.normal(scale=0.4, size=(len(crop_track), 6))
        cannot = [(int(a), int(b)) for a, b in rng.integers(tracks, size=(4, 2)) if a != b]
        result = cluster_tracks(
            CosineDissimilarity().factors(x), crop_track, tracks,
            cannot_link=np.array(cannot).reshape(-1, 2), representatives=CosineDissimilarity().representative,
        )
        assert _same_partition(result.labels, _naive_clustering(x, crop_track, tracks, cannot))


def test_labels_numbered_by_decreasing_size() -> None:
    rng = np.random.default_rng(2)
    x, crop_track, person = _movie(rng, people=3, tracks_per_person=4)
    # Drop tracks so the people have 4, 3 and 1 tracks.
    keep_tracks = np.array([0, 1, 2, 3, 4, 5, 6, 8])
    keep = np.isin(crop_track, keep_tracks)
    remap = -np.ones(len(person), dtype=int)
    remap[keep_tracks] = np.arange(len(keep_tracks))
    result = cluster_movie(x[keep], remap[crop_track[keep]], len(keep_tracks))
    sizes = np.bincount(result.labels)
    assert list(sizes) == sorted(sizes, reverse=True) == [4, 3, 1]


def test_cannot_link_keeps_tracks_on_screen_together_apart() -> None:
    rng = np.random.default_rng(3)
    x, crop_track, person = _movie(rng, people=1, tracks_per_person=6)
    # One person, but tracks 0 and 5 are said to be on screen together: whole clusters respect it.
    together = np.array([[0, 5]])
    constrained = cluster_movie(x, crop_track, len(person), cannot_link=together)
    assert constrained.labels[0] != constrained.labels[5]
    assert constrained.clustering.blocked_merges > 0
    free = cluster_movie(x, crop_track, len(person), cannot_link=None)
    assert free.n_clusters == 1


def test_tracks_without_crops_and_excluded_tracks_are_unknown() -> None:
    rng = np.random.default_rng(4)
    x, crop_track, person = _movie(rng, people=2, tracks_per_person=3)
    n_tracks = len(person) + 1  # the last track has no crops
    exclude = np.zeros(n_tracks, dtype=bool)
    exclude[0] = True
    result = cluster_tracks(CosineDissimilarity().factors(x), crop_track, n_tracks, exclude=exclude)
    assert result.labels[-1] == UNKNOWN and result.labels[0] == UNKNOWN
    assert (result.labels[1:-1] >= 0).all()


def test_nothing_to_cluster_and_bad_input() -> None:
    empty = Factors(u=np.zeros((0, 3)), v=np.zeros((0, 3)), offset=1.0)
    result = cluster_tracks(empty, np.zeros(0, dtype=int), 3)
    assert result.n_clusters == 0 and (result.labels == UNKNOWN).all()
    f = CosineDissimilarity().factors(np.eye(3))
    with pytest.raises(ValueError, match="one entry per crop"):
        cluster_tracks(f, np.zeros(2, dtype=int), 1)
    with pytest.raises(ValueError, match="outside"):
        cluster_tracks(f, np.array([0, 1, 5]), 2)
    with pytest.raises(ValueError, match="outside"):
        cluster_tracks(f, np.array([0, 1, 1]), 2, cannot_link=np.array([[0, 7]]))


def test_single_crop_tracks_can_still_join_a_person() -> None:
    rng = np.random.default_rng(5)
    x, crop_track, person = _movie(rng, people=2, tracks_per_person=5)
    # Track 0 keeps a single crop: it has no spread of its own, its neighbours' thresholds decide.
    first = np.flatnonzero(crop_track == 0)
    keep = np.ones(len(x), dtype=bool)
    keep[first[1:]] = False
    result = cluster_movie(x[keep], crop_track[keep], len(person))
    assert _same_partition(result.labels, person)


def test_quality_screen_leaves_low_side_outliers_unknown() -> None:
    quality = np.array([0.8, 0.81, 0.79, 0.8, 0.82, 0.78, 0.8, 0.2, np.nan])
    low, cut = low_quality_tracks(quality)
    assert list(np.flatnonzero(low)) == [7]
    assert 0.2 < cut < 0.78
    # No spread to judge by: nothing is cut.
    assert not low_quality_tracks(np.array([0.5, 0.1]))[0].any()
    np.testing.assert_allclose(
        track_quality(np.array([1.0, 0.0, 0.5]), np.array([0, 0, 2]), 4), [0.5, np.nan, 0.5, np.nan]
    )


def test_cluster_movie_uses_crop_quality() -> None:
    rng = np.random.default_rng(6)
    x, crop_track, person = _movie(rng, people=2, tracks_per_person=8)
    q = np.full(len(x), 0.8) + rng.normal(scale=0.005, size=len(x))
    q[crop_track == 3] = 0.1
    result = cluster_movie(x, crop_track, len(person), crop_quality=q)
    assert result.labels[3] == UNKNOWN and result.low_quality[3]
    assert result.n_unknown == 1 and result.n_clusters == 2


def test_quality_screen_ignores_differences_within_the_scatter_of_one_track_s_crops() -> None:
    """A small movie of near-equal tracks: MAD alone makes an outlier of a track 0.005 below, the crop scatter does not."""
    means = np.array([0.4803, 0.4803, 0.4825, 0.4819, 0.4807, 0.4798, 0.4791, 0.4785, 0.4755, 0.46])
    pattern = np.array([-0.004, -0.002, 0.0, 0.0, 0.002, 0.004])  # one track's crops: standard deviation 0.0028
    crop_track = np.repeat(np.arange(len(means)), len(pattern))
    crop_quality = means[crop_track] + np.tile(pattern, len(means))
    quality = track_quality(crop_quality, crop_track, len(means))
    scatter = within_track_scatter(crop_quality, crop_track)
    assert scatter == pytest.approx(np.sqrt(8e-6))
    # The median absolute deviation alone (0.00125 here): 0.4755 is an outlier.
    assert list(np.flatnonzero(low_quality_tracks(quality)[0])) == [8, 9]
    # Floored by the crops' scatter, only the track below every crop of the others is.
    low, cut = low_quality_tracks(quality, crop_scatter=scatter)
    assert list(np.flatnonzero(low)) == [9]
    assert cut == pytest.approx(np.median(quality) - 3 * 0.6745 * scatter)
    # Nine near-equal tracks and nothing else: nothing is dropped.
    assert not low_quality_tracks(quality[:9], crop_scatter=scatter)[0].any()


def test_within_track_scatter_is_the_pooled_standard_deviation() -> None:
    rng = np.random.default_rng(8)
    crop_track = rng.integers(0, 12, 200)
    crop_track[crop_track == 5] = 6  # a track without crops
    crop_track[:1] = 11
    crop_quality = rng.normal(0.48, 0.003, 200) + 0.01 * (crop_track % 3)
    squares, dof = 0.0, 0
    for t in np.unique(crop_track):
        q = crop_quality[crop_track == t]
        squares += ((q - q.mean()) ** 2).sum()
        dof += len(q) - 1
    assert within_track_scatter(crop_quality, crop_track) == pytest.approx(np.sqrt(squares / dof), rel=1e-12)
    assert within_track_scatter(np.array([0.5, 0.4]), np.array([0, 1])) == 0.0  # one crop per track: no scatter


def test_every_unknown_track_says_why() -> None:
    rng = np.random.default_rng(9)
    x, crop_track, person = _movie(rng, people=2, tracks_per_person=6)
    q = np.full(len(x), 0.8) + rng.normal(scale=0.005, size=len(x))
    q[crop_track == 3] = 0.1
    keep = crop_track != 7  # track 7: no kept crops
    result = cluster_movie(x[keep], crop_track[keep], len(person), crop_quality=q[keep])
    assert result.unknown_reason[3] == "low_quality" and result.unknown_reason[7] == "no_kept_crops"
    unknown = result.labels == UNKNOWN
    assert all(r is None for r in result.unknown_reason[~unknown]) and unknown.sum() == 2


def test_serfiq_quality_prefers_a_face_to_noise(backbone) -> None:
    from pathlib import Path

    import av

    from vcn.faces.align import align_face, get_template
    from vcn.faces.detection.retinaface import RetinaFaceDetector

    video = Path(__file__).parent / "data" / "hamilton_clip.mp4"
    with av.open(str(video)) as container:
        frame = next(f for i, f in enumerate(container.decode(video=0)) if i == 40).to_ndarray(format="rgb24")
    [faces] = RetinaFaceDetector(threads=2).detect([frame])
    chip = align_face(frame, faces.landmarks[0], get_template(backbone.template))
    noise = np.random.default_rng(0).integers(0, 256, size=chip.shape, dtype=np.uint8)
    q = embed_and_score(backbone, np.stack([chip, noise]), passes=40)[1]
    assert q.shape == (2,) and ((q > 0) & (q <= 1)).all()
    assert q[0] > q[1]
    # Seeded: the same chips give the same qualities.
    np.testing.assert_array_equal(q, embed_and_score(backbone, np.stack([chip, noise]), passes=40)[1])
    with pytest.raises(ValueError, match="uint8"):
        embed_and_score(backbone, np.zeros((1, 10, 10, 3), np.uint8))


def test_embed_and_score_matches_embed(backbone) -> None:
    chips = np.random.default_rng(1).integers(0, 256, size=(5, 150, 150, 3), dtype=np.uint8)
    embeddings, quality = embed_and_score(backbone, chips, passes=10, batch_size=2)
    np.testing.assert_allclose(embeddings, backbone.embed(chips), atol=1e-5)
    assert quality.shape == (5,)
    empty_e, empty_q = embed_and_score(backbone, chips[:0])
    assert empty_e.shape == (0, 128) and empty_q.shape == (0,)


def test_torch_matrix_products_give_the_same_clusters() -> None:
    """The merge rounds' products on a torch device (CUDA on a GPU machine; the CPU here) change nothing."""
    rng = np.random.default_rng(11)
    x, crop_track, person = _movie(rng, people=5, track_noise=0.2, crop_noise=0.4)
    cannot = np.array([[0, 7], [3, 20]])
    numpy_result = cluster_movie(x, crop_track, len(person), cannot_link=cannot)
    assert 1 < numpy_result.n_clusters < 10 and numpy_result.clustering.rounds > 3
    torch_result = cluster_movie(x, crop_track, len(person), cannot_link=cannot, device="cpu")
    assert np.array_equal(numpy_result.labels, torch_result.labels)
    assert numpy_result.clustering.rounds == torch_result.clustering.rounds


def test_row_blocks_give_the_same_clusters_as_one_block() -> None:
    """Rounds computed a few rows at a time (bounded memory on long movies) change nothing."""
    rng = np.random.default_rng(12)
    x, crop_track, person = _movie(rng, people=6, track_noise=0.3, crop_noise=0.5)
    cannot = np.array([[0, 7], [3, 20], [7, 0], [5, 5], [11, 30], [2, 4]])
    factors = CosineDissimilarity().factors(x)
    kwargs = dict(cannot_link=cannot, representatives=CosineDissimilarity().representative)
    whole = cluster_tracks(factors, crop_track, len(person), **kwargs)
    assert 1 < whole.n_clusters < 12 and whole.rounds > 5 and whole.blocked_merges > 0
    for rows in (1, 4, 7):
        blocked = cluster_tracks(factors, crop_track, len(person), block_rows=rows, **kwargs)
        assert np.array_equal(blocked.labels, whole.labels)
        assert (blocked.rounds, blocked.blocked_merges) == (whole.rounds, whole.blocked_merges)
        assert blocked.clusters_per_round == whole.clusters_per_round
    on_torch = cluster_tracks(factors, crop_track, len(person), block_rows=5, device="cpu", **kwargs)
    assert np.array_equal(on_torch.labels, whole.labels)
