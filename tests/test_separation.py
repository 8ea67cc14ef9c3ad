"""The label-free check of an adapted model against the pretrained one (vcn.identity.selfsup.separation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vcn.identity.selfsup.separation import (
    FALSE_MERGE_RATES,
    MIN_NEGATIVES,
    AdaptationCheck,
    check_adaptation,
    separation,
)


def _movie(noise: float, seed: int = 0, people: int = 8, tracks_per_person: int = 15, crops: int = 4):
    """Crops of tracks of ``people`` people (random unit directions); tracks of the same scene (groups of
    consecutive tracks of different people) are on screen together. Same directions for every noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    person = np.tile(np.arange(people), tracks_per_person)  # track t shows person t % people
    n = len(person)
    crop_track = np.repeat(np.arange(n), crops)
    noise_rng = np.random.default_rng(seed + 1)
    track_offsets = noise_rng.normal(size=(n, 64))
    crop_offsets = noise_rng.normal(size=(len(crop_track), 64))
    x = centres[person][crop_track] + noise * track_offsets[crop_track] + 0.3 * noise * crop_offsets
    # Scenes of 4 consecutive tracks: 4 different people on screen together.
    pairs = [(i + a, i + b) for i in range(0, n - 3, 4) for a in range(4) for b in range(a + 1, 4)]
    return x.astype(np.float32), crop_track, np.array(pairs), person


def test_separation_is_the_share_of_track_pairs_closer_than_different_people():
    x, crop_track, pairs, person = _movie(0.15)
    share, negatives = separation(x, crop_track, pairs)
    assert negatives == len(pairs)
    # By hand: unit track means, cosine distances, the pairs that are not on screen together.
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = crop_track.max() + 1
    means = np.stack([unit[crop_track == t].mean(axis=0) for t in range(n)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    d = 1 - means @ means.T
    blocked = {tuple(sorted(p)) for p in pairs.tolist()}
    others = np.array([d[i, j] for i in range(n) for j in range(i + 1, n) if (i, j) not in blocked])
    negative = d[pairs[:, 0], pairs[:, 1]]
    expected = np.mean([(others < np.quantile(negative, f)).mean() for f in FALSE_MERGE_RATES])
    assert share == pytest.approx(expected, abs=1e-9)
    # share = pi * TAR + (1 - pi) * f on average over the rates: here every same-person pair (a share pi of
    # the pairs) is closer than different people (TAR 1), and the rest fall below each quantile at its rate.
    same = np.array([person[i] == person[j] for i in range(n) for j in range(i + 1, n) if (i, j) not in blocked])
    pi = same.mean()
    assert share == pytest.approx(pi + (1 - pi) * np.mean(FALSE_MERGE_RATES), abs=0.02)


def test_a_model_that_keeps_people_apart_better_is_kept():
    sharp, crop_track, pairs, _ = _movie(0.12)
    blurred, _, _, _ = _movie(0.35)
    assert separation(sharp, crop_track, pairs)[0] > separation(blurred, crop_track, pairs)[0]
    kept = check_adaptation(blurred, sharp, crop_track, pairs)
    assert kept.judged and kept.keeps_finetuned and kept.reason() is None
    worse = check_adaptation(sharp, blurred, crop_track, pairs)
    assert worse.judged and not worse.keeps_finetuned
    assert "no better than the pretrained one" in worse.reason() and f"{worse.pretrained:.4f}" in worse.reason()
    # A tie is no gain: the pretrained model stays.
    assert not check_adaptation(sharp, sharp, crop_track, pairs).keeps_finetuned


def test_too_few_tracks_on_screen_together_leave_the_adapted_model_unjudged():
    x, crop_track, pairs, _ = _movie(0.2)
    few = pairs[: MIN_NEGATIVES - 1]
    assert separation(x, crop_track, few) == (None, MIN_NEGATIVES - 1)
    check = check_adaptation(x * 0, x, crop_track, few)
    assert not check.judged and check.keeps_finetuned and check.reason() is None
    assert not check_adaptation(x, x, crop_track, None).judged
    # Pairs of tracks without checked crops do not count.
    sample = crop_track < 8
    assert separation(x[sample], crop_track[sample], pairs)[1] == 12


def test_the_check_round_trips_through_json():
    x, crop_track, pairs, _ = _movie(0.2)
    check = check_adaptation(x, x[::-1].copy()[::-1], crop_track, pairs)
    data = json.loads(json.dumps(check.to_dict()))
    assert AdaptationCheck.from_dict(data) == check and data["keeps_finetuned"] == check.keeps_finetuned
    assert check.tracks == crop_track.max() + 1 and check.crops == len(crop_track)
