"""Whether adapting the backbone made it tell this movie's people apart better, judged without labels.

Tracks on screen together are two people, so their distances sample this
movie's different-person distances for a model (:mod:`vcn.clustering.linkage`
uses the same sample for its cut). Over all pairs of the movie's tracks, the
share closer than the ``f`` quantile of that sample is

    pi * TAR(f) + (1 - pi) * f

where ``pi`` is the share of same-person pairs (a fact of the movie, the same
for every model) and ``TAR(f)`` the share of same-person pairs a cut at that
distance would join. Between two models of one movie that share therefore
compares their TAR at the false-merge rate ``f``: the model with more track
pairs closer than its own different-person distances finds more of each
person's tracks at the same rate of wrong merges. :func:`separation` averages
it over :data:`FALSE_MERGE_RATES`; :func:`check_adaptation` compares the
pretrained and the finetuned model on the same crops.

The sample stays fair for the finetuned model because self-distillation never
uses the on-screen-together pairs as negatives; they are only kept from being
matched as positives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: False-merge rates at which two models are compared: quantiles of the movie's on-screen-together distances
#: (the clustering cuts at the 25 % one).
FALSE_MERGE_RATES = (0.05, 0.1, 0.25)
#: Fewest on-screen-together pairs among the checked tracks to judge on: with fewer, the 5 % quantile
#: rests on one or two pairs.
MIN_NEGATIVES = 40


def separation(embeddings: np.ndarray, crop_track: np.ndarray, cannot_link: np.ndarray) -> tuple[float | None, int]:
    """Share of track pairs closer than the movie's different-person distances, averaged over the rates.

    Args:
        embeddings: (N, D) crop embeddings of one model.
        crop_track: (N,) track of each crop.
        cannot_link: (P, 2) track pairs on screen together (track indices as in ``crop_track``).

    Returns:
        (the share in [0, 1], or None with fewer than :data:`MIN_NEGATIVES` usable pairs; the number of
        on-screen-together pairs among the tracks that have crops).
    """
    crop_track = np.asarray(crop_track, dtype=np.int64)
    tracks, rows = np.unique(crop_track, return_inverse=True)
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    position = np.full(int(max(tracks.max(initial=-1), pairs.max(initial=-1))) + 1, -1, dtype=np.int64)
    position[tracks] = np.arange(len(tracks))
    local = position[pairs]
    local = np.unique(np.sort(local[(local >= 0).all(axis=1) & (local[:, 0] != local[:, 1])], axis=1), axis=0)
    if len(local) < MIN_NEGATIVES:
        return None, len(local)
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    means = np.zeros((len(tracks), x.shape[1]))
    np.add.at(means, rows, x)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    negatives = 1.0 - np.einsum("ij,ij->i", means[local[:, 0]], means[local[:, 1]])
    cuts = np.quantile(negatives, FALSE_MERGE_RATES)
    n = len(tracks)
    others = n * (n - 1) // 2 - len(local)
    if others <= 0:
        return None, len(local)
    # Track pairs closer than each cut, a block of rows at a time (no (T, T) matrix: a long film checks
    # thousands of tracks); the on-screen-together pairs are taken out afterwards.
    below = np.zeros(len(cuts), dtype=np.int64)
    step = max(1, (32 << 20) // (8 * n))
    columns = np.arange(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        distances = 1.0 - means[start:stop] @ means.T
        upper = columns[None, :] > np.arange(start, stop)[:, None]
        for k, cut in enumerate(cuts):
            below[k] += int(np.count_nonzero((distances < cut) & upper))
    below -= np.array([int(np.count_nonzero(negatives < cut)) for cut in cuts])
    return float(np.mean(below / others)), len(local)


@dataclass(frozen=True)
class AdaptationCheck:
    """The pretrained and the finetuned model compared on one movie's crops (:func:`check_adaptation`).

    Attributes:
        pretrained: :func:`separation` of the pretrained model; None when not judged.
        finetuned: The same of the finetuned model.
        negatives: On-screen-together pairs among the checked tracks.
        tracks: Tracks with checked crops.
        crops: Crops embedded by each model.
    """

    pretrained: float | None
    finetuned: float | None
    negatives: int
    tracks: int
    crops: int

    @property
    def judged(self) -> bool:
        return self.pretrained is not None and self.finetuned is not None

    @property
    def keeps_finetuned(self) -> bool:
        """Unjudged (too few tracks on screen together), the method's adapted model stays."""
        return not self.judged or self.finetuned > self.pretrained

    def reason(self) -> str | None:
        """Why the pretrained model is used instead of the finetuned one, in words; None when it is not."""
        if self.keeps_finetuned:
            return None
        return (
            f"the finetuned model separates this movie's people no better than the pretrained one: "
            f"{self.finetuned:.4f} of track pairs are closer than its different-person distances (on-screen-together "
            f"quantiles {', '.join(f'{f:g}' for f in FALSE_MERGE_RATES)}; {self.negatives} pairs), against "
            f"{self.pretrained:.4f} for the pretrained model"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "keeps_finetuned": self.keeps_finetuned}

    @classmethod
    def from_dict(cls, data: dict) -> AdaptationCheck:
        return cls(**{k: data[k] for k in ("pretrained", "finetuned", "negatives", "tracks", "crops")})


def check_adaptation(
    pretrained: np.ndarray, finetuned: np.ndarray, crop_track: np.ndarray, cannot_link: np.ndarray | None
) -> AdaptationCheck:
    """Both models' :func:`separation` on the same crops.

    Args:
        pretrained: (N, D) pretrained embeddings of the crops.
        finetuned: (N, D') finetuned embeddings of the same crops.
        crop_track: (N,) track of each crop.
        cannot_link: (P, 2) track pairs on screen together; None or empty: not judged.
    """
    crop_track = np.asarray(crop_track, dtype=np.int64)
    pairs = np.zeros((0, 2), dtype=np.int64) if cannot_link is None else np.asarray(cannot_link, dtype=np.int64)
    before, negatives = separation(pretrained, crop_track, pairs)
    after, _ = separation(finetuned, crop_track, pairs)
    return AdaptationCheck(
        pretrained=None if before is None else round(before, 6),
        finetuned=None if after is None else round(after, 6),
        negatives=negatives,
        tracks=len(np.unique(crop_track)),
        crops=len(crop_track),
    )
