"""Positive pairs of face crops for self-distillation: same track, or matched tracks.

The method trains on positives only (DESIGN.md section 2). In round 1 a pair is
two crops of one face track, which the tracker guarantees show the same person;
in later rounds a pair may instead join a crop of a track with a crop of a track
that coarse Gaussian matching (:mod:`vcn.identity.selfsup.matching`) found close to it,
which teaches the network that one person looks alike across shots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class PairSampler:
    """Draws epochs of positive crop pairs, balanced over tracks.

    Each pair starts from a track; every track starts the same number of pairs
    in an epoch (to within one), however many crops it has, so that the long
    tracks of the lead actors do not drown the rest of the cast. The tracks are
    taken in shuffled passes over all of them, so an epoch of at least as many
    pairs as tracks covers every track. Within the track the first crop is
    uniform; the second is

    * with probability ``match_fraction``, if the track has matches: a uniform
      crop of a uniformly chosen matched track;
    * otherwise a different crop of the same track, uniform. A track with a
      single crop pairs that crop with itself: the two augmented views
      (:class:`~vcn.identity.selfsup.augment.FaceAugment`) still differ, and the pair
      keeps the track in training.

    Tuning ``match_fraction``: 0.5 (default) gives matched-track pairs the same
    weight as same-track ones. Cross-track pairs carry what the later rounds are
    for (a face across shots, lighting and age), but matching is coarse and some
    matches are wrong; keeping half of the pairs within tracks, which are always
    right, dilutes those errors and keeps the within-track invariance trained.
    Raise it when matches are precise (their precision is logged against labels
    where labels exist), lower it when they are not.

    Matches are used as given: ``matches[t]`` lists the tracks a pair started
    from track ``t`` may borrow from. Pass a symmetric mapping (as
    :meth:`~vcn.identity.selfsup.matching.TrackMatches.as_dict` returns) for symmetric use.

    Draws are deterministic: two samplers built alike with the same seed give
    the same sequence of epochs; successive epochs of one sampler differ.

    Args:
        crop_track: (N,) integer track id of each crop; the pairs index this array.
        matches: Track id to the ids of its matched tracks, or None (round 1).
            Every id must occur in ``crop_track``; a track listed as its own match
            is ignored, and so are repeats.
        seed: Seed of the sampler's random generator.
        match_fraction: Probability, in [0, 1], that a pair started from a track
            with matches takes its second crop from a matched track. Default 0.5.

    Raises:
        ValueError: On an empty or non-integer ``crop_track``, a match naming an
            unknown track, or ``match_fraction`` outside [0, 1].
    """

    def __init__(
        self,
        crop_track: np.ndarray,
        matches: Mapping[int, Sequence[int]] | None = None,
        seed: int | None = 0,
        *,
        match_fraction: float = 0.5,
    ) -> None:
        crop_track = np.asarray(crop_track)
        if crop_track.ndim != 1 or len(crop_track) == 0:
            raise ValueError(f"crop_track must be a non-empty 1-D array, got shape {crop_track.shape}")
        if not np.issubdtype(crop_track.dtype, np.integer):
            raise ValueError(f"crop_track must hold integer track ids, got dtype {crop_track.dtype}")
        if isinstance(match_fraction, bool) or not 0.0 <= float(match_fraction) <= 1.0:
            raise ValueError(f"match_fraction must lie in [0, 1], got {match_fraction!r}")
        self.match_fraction = float(match_fraction)

        # Crops grouped by track: the crops of track index i are _crops[_start[i] : _start[i] + _count[i]].
        self.track_ids, track_index, self._count = np.unique(crop_track, return_inverse=True, return_counts=True)
        self._crops = np.argsort(track_index, kind="stable")
        self._start = np.concatenate([[0], np.cumsum(self._count)[:-1]])

        # Matches as the same kind of grouping, over track indices.
        partners: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(self.track_ids)
        for track, matched in (matches or {}).items():
            index = self._index_of([track], "matches key")[0]
            others = np.unique(self._index_of(list(matched), f"matches[{track}]"))
            partners[index] = others[others != index]
        self._match_count = np.array([len(p) for p in partners], dtype=np.int64)
        self._match_start = np.concatenate([[0], np.cumsum(self._match_count)[:-1]])
        self._matched = np.concatenate(partners).astype(np.int64)

        self._rng = np.random.default_rng(seed)

    def _index_of(self, ids: Sequence[int], where: str) -> np.ndarray:
        ids = np.asarray(ids)
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{where}: track ids must be integers, got {ids.tolist()[:5]}")
        index = np.minimum(np.searchsorted(self.track_ids, ids), len(self.track_ids) - 1)
        unknown = ids[self.track_ids[index] != ids]
        if len(unknown):
            raise ValueError(f"{where}: track ids {unknown.tolist()[:5]} have no crops in crop_track")
        return index.astype(np.int64)

    @property
    def n_tracks(self) -> int:
        """Number of distinct tracks."""
        return len(self.track_ids)

    @property
    def n_crops(self) -> int:
        """Number of crops (the length of ``crop_track``)."""
        return len(self._crops)

    @property
    def n_matched_tracks(self) -> int:
        """Number of tracks that have at least one matched track."""
        return int((self._match_count > 0).sum())

    def epoch(self, n_pairs: int | None = None) -> np.ndarray:
        """The pairs of one epoch.

        Args:
            n_pairs: How many pairs; default the number of crops, so that an
                epoch shows each crop about twice (two views per pair).

        Returns:
            (n_pairs, 2) int64 crop indices into ``crop_track``, ``[first, second]``.
            Consecutive runs of :attr:`n_tracks` pairs start from distinct tracks.
        """
        if n_pairs is None:
            n_pairs = self.n_crops
        if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 0:
            raise ValueError(f"n_pairs must be a non-negative int, got {n_pairs!r}")
        rng = self._rng
        n = int(n_pairs)

        # Tracks in shuffled passes: every track starts n // T or n // T + 1 pairs.
        passes = -(-n // self.n_tracks)
        track = np.concatenate([rng.permutation(self.n_tracks) for _ in range(passes)] or [np.zeros(0, np.int64)])[:n]
        count = self._count[track]

        # First crop: uniform in the track.
        first = np.floor(rng.random(n) * count).astype(np.int64)
        # Second crop: another crop of the track (the same one if it has only one) ...
        second = np.floor(rng.random(n) * (count - 1)).astype(np.int64)
        second += second >= first
        second = np.minimum(second, count - 1)
        # ... or, for some pairs of tracks with matches, a crop of a matched track.
        borrow = (self._match_count[track] > 0) & (rng.random(n) < self.match_fraction)
        pick, across = rng.random(n), rng.random(n)
        second_track = track.copy()
        borrower = track[borrow]
        second_track[borrow] = self._matched[
            self._match_start[borrower] + np.floor(pick[borrow] * self._match_count[borrower]).astype(np.int64)
        ]
        second[borrow] = np.floor(across[borrow] * self._count[second_track[borrow]]).astype(np.int64)

        a = self._crops[self._start[track] + first]
        b = self._crops[self._start[second_track] + second]
        return np.stack([a, b], axis=1).astype(np.int64)
