"""Tests of the data side of self-supervised adaptation: augmentations, pair sampling, track matching.

The augmentations are checked against exact expectations (a flip mirrors, a 90 degree
rotation is ``torch.rot90``) and on real faces through the dlib backbone; the
matcher against an independently written reference (scipy's multivariate normal,
a loop over all track pairs) and on synthetic identities with known labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf_shrinkage

from vcn.identity.selfsup.augment import (
    FaceAugment,
    color_temperature,
    hflip,
    rotate,
    scale_brightness,
)
from vcn.identity.selfsup.matching import (
    fit_track_gaussians,
    ledoit_wolf_intensity,
    match_precision,
    match_tracks,
)
from vcn.identity.selfsup.pairs import PairSampler

HAMILTON = Path(__file__).parent / "data" / "hamilton_clip.mp4"


def random_chips(n: int = 4, size: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator, dtype=torch.float64) * 255).to(dtype)


# --- augmentations -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_keeps_shape_dtype_range_and_input(dtype: torch.dtype) -> None:
    chips = random_chips(dtype=dtype)
    before = chips.clone()
    out = FaceAugment(brightness=0.2)(chips, torch.Generator().manual_seed(0))
    assert out.shape == chips.shape and out.dtype == dtype and out.device == chips.device
    assert out.min() >= 0 and out.max() <= 255
    torch.testing.assert_close(chips, before, rtol=0, atol=0)
    assert not torch.equal(out, chips)


def test_flip_mirrors_exactly_and_zero_ranges_are_identity() -> None:
    chips = random_chips()
    expected = torch.stack([chip[:, :, torch.arange(31, -1, -1)] for chip in chips])
    assert torch.equal(hflip(chips), expected)
    always = FaceAugment(flip_p=1.0, max_rotation=0.0, temperature=0.0)
    assert torch.equal(always(chips, torch.Generator().manual_seed(1)), expected)
    never = FaceAugment(flip_p=0.0, max_rotation=0.0, temperature=0.0)
    assert torch.equal(never(chips, torch.Generator().manual_seed(1)), chips)
    # With p = 0.5 some chips of a batch are mirrored and the others untouched.
    many = random_chips(64)
    out = FaceAugment(max_rotation=0.0, temperature=0.0)(many, torch.Generator().manual_seed(2))
    mirrored = torch.tensor([torch.equal(o, c.flip(-1)) for o, c in zip(out, many)])
    kept = torch.tensor([torch.equal(o, c) for o, c in zip(out, many)])
    assert (mirrored | kept).all() and 16 < int(mirrored.sum()) < 48


def test_rotation_by_zero_is_identity_and_by_ninety_is_rot90() -> None:
    chips = random_chips(size=31)
    torch.testing.assert_close(rotate(chips, 0.0), chips, rtol=0, atol=1e-3)
    torch.testing.assert_close(rotate(chips, 90.0), torch.rot90(chips, 1, dims=(2, 3)), rtol=0, atol=1e-3)
    torch.testing.assert_close(rotate(chips, -90.0), torch.rot90(chips, -1, dims=(2, 3)), rtol=0, atol=1e-3)
    # Per-chip angles.
    angles = torch.tensor([0.0, 90.0, -90.0, 0.0])
    expected = torch.stack([chips[0], torch.rot90(chips[1], 1, (1, 2)), torch.rot90(chips[2], -1, (1, 2)), chips[3]])
    torch.testing.assert_close(rotate(chips, angles), expected, rtol=0, atol=1e-3)


def test_rotation_turns_about_the_centre_and_fills_black() -> None:
    white = torch.full((1, 3, 41, 41), 255.0)
    turned = rotate(white, 45.0)
    assert turned[0, :, 20, 20].eq(255).all()  # the centre stays
    assert turned[0, :, 0, 0].eq(0).all() and turned[0, :, 40, 40].eq(0).all()  # corners come from outside
    # A small rotation moves a point on a circle about the centre by the expected arc.
    spot = torch.zeros(1, 3, 41, 41)
    spot[0, :, 20, 35] = 255.0  # 15 px right of the centre
    moved = rotate(spot, 10.0)[0, 0]
    ys, xs = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    cx, cy = float((moved * xs).sum() / moved.sum()), float((moved * ys).sum() / moved.sum())
    # Counter-clockwise on screen: the spot rises (y decreases) and keeps its distance to the centre.
    assert cx == pytest.approx(20 + 15 * math.cos(math.radians(10)), abs=0.1)
    assert cy == pytest.approx(20 - 15 * math.sin(math.radians(10)), abs=0.1)


def test_color_temperature_keeps_green_and_moves_red_and_blue_oppositely() -> None:
    chips = random_chips(8) * 0.8  # below 204, so that +15 % never clamps
    warm = color_temperature(chips, 0.1)
    torch.testing.assert_close(warm[:, 0], chips[:, 0] * 1.1)
    torch.testing.assert_close(warm[:, 1], chips[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(warm[:, 2], chips[:, 2] * 0.9)
    assert color_temperature(torch.full((1, 3, 2, 2), 250.0), 0.1).max() == 255  # clamped

    out = FaceAugment(flip_p=0.0, max_rotation=0.0, temperature=0.15)(chips, torch.Generator().manual_seed(3))
    assert torch.equal(out[:, 1], chips[:, 1])
    red = (out[:, 0] / chips[:, 0]).mean(dim=(1, 2)) - 1
    blue = (out[:, 2] / chips[:, 2]).mean(dim=(1, 2)) - 1
    torch.testing.assert_close(red, -blue, rtol=0, atol=1e-4)
    assert (red.abs() <= 0.15 + 1e-5).all() and red.abs().max() > 0.02
    assert (red > 0).any() and (red < 0).any()


def test_brightness_scales_all_channels() -> None:
    chips = random_chips() * 0.5
    torch.testing.assert_close(scale_brightness(chips, 0.2), chips * 1.2)
    per_chip = torch.tensor([0.0, 0.1, -0.1, 0.2])
    torch.testing.assert_close(scale_brightness(chips, per_chip), chips * (1 + per_chip)[:, None, None, None])


def test_augment_is_deterministic_with_a_seed() -> None:
    chips = random_chips(6)
    augment = FaceAugment(brightness=0.1)
    a = augment(chips, torch.Generator().manual_seed(7))
    b = augment(chips, torch.Generator().manual_seed(7))
    c = augment(chips, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Two calls on one generator give two different views (the two views of a pair).
    generator = torch.Generator().manual_seed(7)
    assert not torch.equal(augment(chips, generator), augment(chips, generator))


def test_augment_rejects_bad_input() -> None:
    augment = FaceAugment()
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="floating point"):
        augment(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), generator)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        augment(torch.zeros(3, 8, 8), generator)
    with pytest.raises(TypeError, match="torch.Generator"):
        augment(torch.zeros(1, 3, 8, 8), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.Tensor"):
        augment(np.zeros((1, 3, 8, 8)), generator)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        FaceAugment(temperature=1.0)
    with pytest.raises(ValueError, match="flip_p"):
        FaceAugment(flip_p=1.5)
    with pytest.raises(ValueError, match="one value per chip"):
        rotate(torch.zeros(2, 3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        color_temperature(torch.zeros(1, 3, 8, 8), 1.0)


@pytest.fixture(scope="module")
def face_chips() -> np.ndarray:
    """Real faces from the test clip, aligned to dlib-150: (F, 150, 150, 3) uint8."""
    import av

    from vcn.faces.align import align_face, get_template
    from vcn.faces.detection.retinaface import RetinaFaceDetector

    with av.open(str(HAMILTON)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in (40, 250)]
    template = get_template("dlib-150")
    chips = [
        align_face(frame, landmarks, template)
        for frame, faces in zip(frames, RetinaFaceDetector(threads=2).detect(frames))
        for landmarks, score in zip(faces.landmarks, faces.scores)
        if score > 0.9
    ]
    assert len(chips) >= 4
    return np.stack(chips)


def test_an_augmented_face_embeds_like_the_face(face_chips: np.ndarray) -> None:
    import vcn

    backbone = vcn.load_backbone("dlib-resnet", device="cpu")
    x = torch.from_numpy(face_chips).permute(0, 3, 1, 2).float()

    def embed(chips: torch.Tensor) -> np.ndarray:
        as_uint8 = chips.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return backbone.embed(as_uint8)

    original = embed(x)
    # The strongest view the defaults allow: mirrored, 10 degrees, +-15 % temperature.
    worst = [
        color_temperature(rotate(hflip(x), 10.0), 0.15),
        color_temperature(rotate(x, -10.0), -0.15),
    ]
    generator = torch.Generator().manual_seed(0)
    random_views = [FaceAugment()(x, generator) for _ in range(2)]
    for view in worst + random_views:
        cosine = (embed(view) * original).sum(axis=1)
        assert (cosine > 0.9).all(), cosine
    # ... while different people stay apart: the views are closer to their own face than to any other.
    similarity = embed(random_views[0]) @ original.T
    assert (similarity.argmax(axis=1) == np.arange(len(x))).all()


# --- pair sampler ------------------------------------------------------------------------------


def toy_tracks() -> np.ndarray:
    """Crops of tracks 3 (1 crop), 7 (2 crops), 10 (5 crops), 42 (200 crops), interleaved."""
    crop_track = np.repeat([3, 7, 10, 42], [1, 2, 5, 200])
    return np.random.default_rng(0).permutation(crop_track)


def test_round_one_pairs_are_two_crops_of_one_track_balanced_over_tracks() -> None:
    crop_track = toy_tracks()
    sampler = PairSampler(crop_track, seed=0)
    assert sampler.n_tracks == 4 and sampler.n_crops == 208 and sampler.n_matched_tracks == 0
    pairs = sampler.epoch(1001)
    assert pairs.shape == (1001, 2) and pairs.dtype == np.int64
    first, second = crop_track[pairs[:, 0]], crop_track[pairs[:, 1]]
    assert (first == second).all()
    # Two different crops, except in the one-crop track, which pairs its crop with itself.
    single = first == 3
    assert (pairs[single, 0] == pairs[single, 1]).all()
    assert (pairs[~single, 0] != pairs[~single, 1]).all()
    # Every track starts the same number of pairs (to within one), the 200-crop one included.
    starts = np.array([(first == t).sum() for t in (3, 7, 10, 42)])
    assert starts.max() - starts.min() <= 1 and starts.sum() == 1001
    # Within the long track, crops are drawn from all over it.
    assert len(np.unique(pairs[first == 42])) > 150
    # Default epoch length: one pair per crop; a short epoch still covers every track.
    assert sampler.epoch().shape == (208, 2)
    assert set(crop_track[sampler.epoch(4)[:, 0]]) == {3, 7, 10, 42}
    assert sampler.epoch(0).shape == (0, 2)


def test_matched_pairs_stay_within_matched_tracks() -> None:
    crop_track = toy_tracks()
    matches = {3: [42], 42: [3, 10], 10: [42]}
    sampler = PairSampler(crop_track, matches, seed=1)
    assert sampler.n_matched_tracks == 3
    pairs = sampler.epoch(4000)
    first, second = crop_track[pairs[:, 0]], crop_track[pairs[:, 1]]
    allowed = {(t, t) for t in (3, 7, 10, 42)} | {(3, 42), (42, 3), (42, 10), (10, 42)}
    assert set(zip(first.tolist(), second.tolist())) == allowed
    # Half the pairs of a track with matches cross to a matched track; track 7 has none.
    for track in (3, 10, 42):
        crossing = (second[first == track] != track).mean()
        assert 0.4 < crossing < 0.6, (track, crossing)
    assert (second[first == 7] == 7).all()
    # Track 42 borrows from both of its matches.
    borrowed = second[(first == 42) & (second != 42)]
    assert 0.35 < (borrowed == 3).mean() < 0.65

    always = PairSampler(crop_track, matches, seed=1, match_fraction=1.0).epoch(400)
    a, b = crop_track[always[:, 0]], crop_track[always[:, 1]]
    assert (b[a == 3] == 42).all() and (b[a == 7] == 7).all()


def test_pair_sampler_is_deterministic_with_a_seed() -> None:
    crop_track = toy_tracks()
    one, two = PairSampler(crop_track, {7: [10]}, seed=5), PairSampler(crop_track, {7: [10]}, seed=5)
    first_epochs = [one.epoch(300) for _ in range(3)]
    assert all(np.array_equal(e, two.epoch(300)) for e in first_epochs)
    assert not np.array_equal(first_epochs[0], first_epochs[1])
    assert not np.array_equal(first_epochs[0], PairSampler(crop_track, {7: [10]}, seed=6).epoch(300))


def test_pair_sampler_rejects_bad_input() -> None:
    crop_track = toy_tracks()
    with pytest.raises(ValueError, match="no crops"):
        PairSampler(crop_track, {3: [4]})
    with pytest.raises(ValueError, match="no crops"):
        PairSampler(crop_track, {5: [3]})
    with pytest.raises(ValueError, match="integer"):
        PairSampler(crop_track.astype(float))
    with pytest.raises(ValueError, match="non-empty"):
        PairSampler(np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="match_fraction"):
        PairSampler(crop_track, match_fraction=1.5)
    with pytest.raises(ValueError, match="n_pairs"):
        PairSampler(crop_track).epoch(-1)
    # Self-matches and repeats are ignored.
    sampler = PairSampler(crop_track, {3: [3, 3]})
    assert sampler.n_matched_tracks == 0


# --- track matching ----------------------------------------------------------------------------


def synthetic_tracks(
    n_identities: int = 5, tracks_per_identity: int = 8, dim: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings of tracks of a few well-separated identities.

    Returns (embeddings, crop_track, track_identity). Identities lie far apart;
    each track sits a little off its identity's centre (other shot, other light)
    and its crops scatter around the track's centre; tracks have 1 to 40 crops.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, size=(n_identities, dim))
    identity = np.repeat(np.arange(n_identities), tracks_per_identity)
    track_centres = centres[identity] + rng.normal(0, 0.03, size=(len(identity), dim))
    lengths = rng.integers(1, 41, size=len(identity))
    lengths[::7] = 1
    crop_track = np.repeat(np.arange(len(identity)), lengths)
    embeddings = track_centres[crop_track] + rng.normal(0, 0.1, size=(len(crop_track), dim))
    return embeddings, crop_track, identity


def test_matches_join_tracks_of_one_identity() -> None:
    embeddings, crop_track, identity = synthetic_tracks()
    n_tracks = len(identity)
    matches = match_tracks(embeddings, crop_track, n_tracks)
    assert matches.pairs.ndim == 2 and matches.pairs.shape[1] == 2 and matches.count == len(matches) > 0
    assert (matches.pairs[:, 0] < matches.pairs[:, 1]).all()
    assert match_precision(matches.pairs, identity) >= 0.98
    # Most tracks find another track of their identity.
    matched = np.zeros(n_tracks, bool)
    matched[matches.pairs.ravel()] = True
    assert matched.mean() >= 0.8
    # The mutual relation is the stricter subset.
    mutual = match_tracks(embeddings, crop_track, n_tracks, mutual=True)
    assert set(map(tuple, mutual.pairs.tolist())) <= set(map(tuple, matches.pairs.tolist()))
    assert 0 < mutual.count < matches.count
    # as_dict is symmetric and feeds the pair sampler.
    as_dict = matches.as_dict()
    assert all(t in as_dict[u] for t, others in as_dict.items() for u in others)
    pairs = PairSampler(crop_track, as_dict, seed=0).epoch(2000)
    assert (identity[crop_track[pairs[:, 0]]] == identity[crop_track[pairs[:, 1]]]).mean() >= 0.98


def test_cannot_link_pairs_never_match() -> None:
    embeddings, crop_track, identity = synthetic_tracks()
    free = match_tracks(embeddings, crop_track, len(identity))
    banned = free.pairs[::3]
    flipped = banned[:, ::-1]  # either order
    constrained = match_tracks(embeddings, crop_track, len(identity), cannot_link=flipped)
    kept = {tuple(p) for p in free.pairs.tolist()} - {tuple(p) for p in banned.tolist()}
    assert {tuple(p) for p in constrained.pairs.tolist()} == kept
    with pytest.raises(ValueError, match="cannot_link"):
        match_tracks(embeddings, crop_track, len(identity), cannot_link=[[0, len(identity)]])


def reference_matches(embeddings: np.ndarray, crop_track: np.ndarray, n_tracks: int, **kwargs) -> set:
    """Naive matching with scipy densities and a loop over all track pairs, from the fitted Gaussians."""
    gaussians = fit_track_gaussians(embeddings, crop_track, n_tracks, **kwargs)
    points = gaussians.project(embeddings)
    dists = [multivariate_normal(gaussians.means[t], gaussians.covariances[t]) for t in range(n_tracks)]
    thresholds = []
    for t in range(n_tracks):
        own = np.sort(dists[t].logpdf(points[crop_track == t]).reshape(-1))
        lowest = own[: max(1, math.ceil(0.25 * len(own)))]
        thresholds.append(math.log(np.mean(np.exp(lowest.astype(np.longdouble)))))
    found = set()
    for t in range(n_tracks):
        for u in range(n_tracks):
            if t != u and dists[t].logpdf(gaussians.means[u]) >= thresholds[t]:
                found.add((min(t, u), max(t, u)))
    return found


@pytest.mark.parametrize("pca_dim", [3, None])
def test_log_pdf_thresholds_and_matches_agree_with_a_scipy_reference(pca_dim: int | None) -> None:
    rng = np.random.default_rng(1)
    n_tracks, dim = 7, 5
    lengths = np.array([1, 2, 3, 6, 10, 25, 4])
    crop_track = np.repeat(np.arange(n_tracks), lengths)
    centres = rng.normal(0, 0.4, size=(n_tracks, dim))
    centres[4:] = centres[3]  # some overlapping tracks, so that there is something to match
    embeddings = centres[crop_track] + rng.normal(0, 0.3, size=(len(crop_track), dim))

    gaussians = fit_track_gaussians(embeddings, crop_track, n_tracks, pca_dim=pca_dim)
    points = gaussians.project(embeddings)
    assert points.shape == (len(crop_track), 3 if pca_dim else dim)
    log_pdf = gaussians.log_pdf(points)
    for t in range(n_tracks):
        expected = multivariate_normal(gaussians.means[t], gaussians.covariances[t]).logpdf(points)
        np.testing.assert_allclose(log_pdf[t], expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        gaussians._own_log_pdf(points, crop_track), log_pdf[crop_track, np.arange(len(points))], rtol=1e-10
    )
    # The PCA basis is orthonormal and the covariances symmetric positive definite.
    if pca_dim:
        np.testing.assert_allclose(gaussians.basis.T @ gaussians.basis, np.eye(3), atol=1e-10)
    assert (np.linalg.eigvalsh(gaussians.covariances) > 0).all()

    matches = match_tracks(embeddings, crop_track, n_tracks, pca_dim=pca_dim)
    assert {tuple(p) for p in matches.pairs.tolist()} == reference_matches(
        embeddings, crop_track, n_tracks, pca_dim=pca_dim
    )
    assert matches.count > 0


def test_shrinkage_leans_on_the_pooled_covariance_for_short_tracks() -> None:
    # Tracks whose crops spread in shapes of their own: long tracks can afford their own shape.
    rng = np.random.default_rng(5)
    lengths = np.array([1, 2, 3, 4, 150, 200, 250] * 3)
    crop_track = np.repeat(np.arange(len(lengths)), lengths)
    spread = rng.uniform(0.02, 0.5, size=(len(lengths), 8))
    noise = rng.normal(size=(len(crop_track), 8)) * spread[crop_track]
    embeddings = rng.normal(size=(len(lengths), 8))[crop_track] + noise
    gaussians = fit_track_gaussians(embeddings, crop_track, len(lengths), pca_dim=None)
    counts = gaussians.counts
    one = np.flatnonzero(counts == 1)
    assert (gaussians.shrinkage[one] == 1).all()
    np.testing.assert_allclose(gaussians.covariances[one], np.broadcast_to(gaussians.pooled, (len(one), 8, 8)))
    assert ((gaussians.shrinkage > 0) & (gaussians.shrinkage <= 1)).all()
    short, long = gaussians.shrinkage[(counts >= 2) & (counts <= 4)], gaussians.shrinkage[counts >= 150]
    assert short.min() > 0.7 and long.max() < 0.3
    # Two crops: Ledoit-Wolf alone would not shrink at all; the floor prior_crops / (prior_crops + 1) does.
    np.testing.assert_allclose(gaussians.shrinkage[counts == 2], 8 / 9)


def test_ledoit_wolf_intensity_matches_sklearn_towards_a_scaled_identity() -> None:
    rng = np.random.default_rng(2)
    for n, k in ((5, 8), (40, 8), (200, 3)):
        rows = rng.normal(size=(n, k)) * rng.uniform(0.5, 2, size=k)
        rows -= rows.mean(axis=0)
        scatter = rows.T @ rows / n
        fourth = ((rows**2).sum(axis=1) ** 2).mean()
        target = np.trace(scatter) / k * np.eye(k)
        ours = ledoit_wolf_intensity(scatter[None], np.array([fourth]), np.array([n]), target)
        np.testing.assert_allclose(ours, [ledoit_wolf_shrinkage(rows, assume_centered=True)], rtol=1e-10)


def test_degenerate_inputs_do_not_crash() -> None:
    rng = np.random.default_rng(3)
    # One track.
    one = match_tracks(rng.normal(size=(10, 16)), np.zeros(10, int), 1)
    assert one.count == 0 and one.pairs.shape == (0, 2) and np.isfinite(one.thresholds).all()
    # Only one-crop tracks (no within-track spread anywhere); two of them identical.
    x = rng.normal(size=(6, 16))
    x[5] = x[4]
    singles = match_tracks(x, np.arange(6), 6)
    assert {tuple(p) for p in singles.pairs.tolist()} <= {(4, 5)}
    # Tracks without crops, fewer crops than PCA dimensions, identical embeddings.
    gappy = match_tracks(rng.normal(size=(5, 64)), np.array([0, 0, 2, 2, 2]), 4)
    assert np.isnan(gappy.thresholds[[1, 3]]).all() and not np.isin(gappy.pairs, [1, 3]).any()
    same = match_tracks(np.ones((6, 8)), np.repeat([0, 1, 2], 2), 3)
    assert same.count == 3  # indistinguishable tracks all match
    # No crops at all, and a one-dimensional embedding.
    assert match_tracks(np.zeros((0, 8)), np.zeros(0, int), 0).count == 0
    assert match_tracks(np.zeros((0, 8)), np.zeros(0, int), 3).count == 0
    match_tracks(rng.normal(size=(6, 1)), np.repeat([0, 1, 2], 2), 3)


def test_matching_rejects_bad_input() -> None:
    x = np.zeros((4, 8))
    with pytest.raises(ValueError, match="crop_track"):
        match_tracks(x, np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        match_tracks(x, np.array([0, 1, 2, 1]), 2)
    with pytest.raises(ValueError, match="non-finite"):
        match_tracks(np.full((4, 8), np.nan), np.zeros(4, int), 1)
    with pytest.raises(ValueError, match="quantile"):
        match_tracks(x, np.zeros(4, int), 1, quantile=0.0)
    with pytest.raises(ValueError, match="pca_dim"):
        match_tracks(x, np.zeros(4, int), 1, pca_dim=0)


def test_many_tracks_are_matched_in_blocks() -> None:
    """3,000 tracks of 300 identities: every track mean under every Gaussian, in bounded blocks."""
    rng = np.random.default_rng(4)
    n_tracks, dim = 3000, 128
    identity = rng.integers(0, 300, size=n_tracks)
    centres = rng.normal(size=(300, dim))
    crop_track = np.repeat(np.arange(n_tracks), rng.integers(1, 12, size=n_tracks))
    embeddings = (centres[identity] + rng.normal(0, 0.03, size=(n_tracks, dim)))[crop_track]
    embeddings += rng.normal(0, 0.1, size=embeddings.shape)
    matches = match_tracks(embeddings, crop_track, n_tracks)
    assert matches.count > n_tracks and match_precision(matches.pairs, identity) > 0.99


def test_match_precision() -> None:
    labels = np.array(["a", "a", "b", "b", "c"])
    assert match_precision(np.array([[0, 1], [2, 3], [1, 2], [0, 4]]), labels) == 0.5
    assert match_precision(np.array([[0, 1]]), labels) == 1.0
    assert math.isnan(match_precision(np.zeros((0, 2), int), labels))
    with pytest.raises(ValueError, match="pairs"):
        match_precision(np.array([[0, 5]]), labels)
