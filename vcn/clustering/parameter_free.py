"""Parameter-free clustering of face tracks with per-cluster adaptive thresholds.

:func:`cluster_movie` (the product's entry point) screens quality and then clusters
by :mod:`vcn.clustering.linkage` (a cut from the movie's own tracks on screen
together); this module's rule runs when a movie has too few of those, and with
cannot-link off (the paper's setting).

The paper's clustering (DESIGN.md section 3) needs no distance threshold and no
number of people:

1. Every track starts as its own cluster.
2. Each cluster's threshold theta is its own spread: the mean dissimilarity over
   the pairs of its crops that come from different tracks (for a single track,
   over all pairs of its crops).
3. Clusters A and B match when ``S(A, B) < theta_A`` or ``S(A, B) < theta_B``: a
   cluster accepts a neighbour that is closer to it than its own members are to
   each other.
4. Thresholds are recomputed and 2-3 repeat until nothing merges.

Our reading where the paper is silent, measured on the labelled development
episode (``benchmarks/cluster_quality.py``; numbers in
``benchmarks/results/cluster_quality.md``):

- ``S(A, B)`` compares the clusters' representatives (for cosine: the unit mean
  direction of all their crops), not the mean over all crop pairs. The pair mean still
  holds each cluster's own spread, so with a pretrained model, whose crops of one
  track are near-duplicates while different tracks of one person are not, a single
  track's theta (its crop spread) is far below any S and almost nothing merges (38
  clusters per identity on the development episode). The paper's finetuned loss
  metric saturates for one person and hides this; cosine does not.
- theta leaves out the pairs inside each track once a cluster holds several.
  Crops of one track are near-duplicates of one face; how close they are says
  how steady the tracker and the model are, not how varied the person is. Three
  readings were measured (PCR / BCubed F % on the development episode with the
  pretrained model and with a finetuned model after its first and its second
  round, and on two
  validation episodes rendered from other faces and other real episode
  structures by ``benchmarks/make_trackset.py``):

  ========================= ============ ============ ============ =========== ===========
  theta of a larger cluster  pretrained   round 1      round 2      5 people    14 people
  ========================= ============ ============ ============ =========== ===========
  pairs of track means       0.67 / 59.9  0.60 / 56.6  1.13 / 60.1  1.20 / 89.6 0.57 / 63.8
  all crop pairs             1.07 / 59.9  1.07 / 59.2  12.5 / 50.5  1.00 / 96.3 0.57 / 64.0
  crop pairs across tracks   1.33 / 60.8  0.93 / 61.5  1.20 / 53.1  1.00 / 96.3 0.57 / 64.0
  ========================= ============ ============ ============ =========== ===========

  Track means (each track one item, centroids of track means) let the main
  characters' clusters absorb rare ones; all crop pairs make the threshold as
  small as the within-track spread, and a finetuning run that pulls each track's
  crops together (round one trains on same-track pairs) then splits the cast
  into 187 clusters. Cross-track crop pairs, with crop-weighted centroids, were
  the only reading in the PCR band (0.8-1.5) on all three development
  embeddings. None of them reaches the band on the 14-person validation
  episode (8 clusters: two pairs of its main characters and most of its minor
  ones share clusters).
- Each round merges the pairs of clusters that are each other's closest match
  rather than every match transitively: with centroids, a transitive closure of
  all matches chains through the overlap between similar people and collapses a
  cast into a few clusters. Merging mutual best matches and recomputing the
  thresholds after every round still reaches the fixed point of the rule (no
  matching pair left), one safe step at a time.
- Cannot-link (on by default, switchable off): tracks on screen together (same
  shot, overlapping frames) are two people. Clusters holding such a pair of tracks
  never match, so the constraint holds for whole clusters after every merge.

The dissimilarity is pluggable (:mod:`vcn.clustering.dissimilarity`): cosine on the
pretrained embeddings, or the finetuned model's own loss. Both are bilinear in
per-crop factors, so every cluster is two mean vectors, and one matrix product
gives all cluster-to-cluster dissimilarities of a round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vcn.clustering.dissimilarity import Dissimilarity, Factors

log = logging.getLogger(__name__)

#: Label of a track left out of the clustering (Unknown).
UNKNOWN = -1


@dataclass(frozen=True)
class ClusteringResult:
    """What :func:`cluster_tracks` found.

    Attributes:
        labels: (T,) int64 cluster per track, ``0..C-1`` numbered by decreasing
            size (ties by first track), :data:`UNKNOWN` for tracks left out.
        n_clusters: Number of clusters C.
        rounds: Merge rounds run until the fixed point (the last one merged nothing).
        clusters_per_round: Number of clusters after each round.
        blocked_merges: Matches refused, summed over rounds, because the two
            clusters hold tracks that are on screen together.
        rule: ``"negative-cut"`` (average linkage cut at the movie's own
            different-person distances, :mod:`vcn.clustering.linkage`) or
            ``"adaptive-threshold"`` (the paper's per-cluster thresholds, this module).
        cut: The distance cut of ``"negative-cut"``; None for the other rule.
        group_cut: The stricter cut of ``"negative-cut"`` for two clusters of several tracks each
            (:data:`vcn.clustering.linkage.GROUP_QUANTILE`); None for the other rule.
        same_person_reach: How far apart the movie's tracks of one person reach
            (:func:`vcn.clustering.linkage.same_person_reach`); the cut is at most this. None when
            not estimated (the other rule, the loss metric, too few pairs on screen together).
        attached: Tracks kept out of the linkage (low quality) that then joined a cluster within the cut.
    """

    labels: np.ndarray
    n_clusters: int
    rounds: int
    clusters_per_round: list[int] = field(default_factory=list)
    blocked_merges: int = 0
    rule: str = "adaptive-threshold"
    cut: float | None = None
    group_cut: float | None = None
    same_person_reach: float | None = None
    attached: int = 0


def cluster_tracks(
    factors: Factors,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    representatives: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    max_rounds: int = 100_000,
    device: str | None = None,
    block_rows: int | None = None,
) -> ClusteringResult:
    """Clusters tracks by the adaptive-threshold merge rule until a fixed point.

    Args:
        factors: Bilinear factors of the dissimilarity, one row per crop
            (:meth:`vcn.clustering.dissimilarity.CosineDissimilarity.factors`).
        crop_track: (N,) index of each crop's track, in ``0..n_tracks-1``.
        n_tracks: Number of tracks T. Tracks without crops are left Unknown.
        cannot_link: (P, 2) pairs of track indices that must not share a cluster
            (tracks on screen together); None or empty to switch the constraint off.
        exclude: (T,) bool, tracks to leave Unknown (low quality); not clustered.
        representatives: Maps clusters' mean factors to the factors of the points
            that stand for them (:meth:`vcn.clustering.dissimilarity.Dissimilarity.representative`);
            None compares clusters by the mean over all their crop pairs.
        max_rounds: Safety stop; the procedure reaches its fixed point long before
            (every round but the last merges at least two clusters).
        device: Where each round's cluster-to-cluster matrix product runs: None
            for numpy, or a torch device (``"cuda"``: the loss metric's wide
            factors, thousands of columns, make that product the clustering's
            cost). Float32 either way.
        block_rows: Clusters whose dissimilarity rows are computed at once; by
            default as many as keep a block near 32 MiB. A round never holds the
            whole clusters-by-clusters matrix, so memory grows with the number
            of tracks, not its square.

    Returns:
        The labels and a short history of the run.

    Raises:
        ValueError: On inconsistent shapes or out-of-range indices.
    """
    crop_track = np.asarray(crop_track, dtype=np.int64)
    if crop_track.shape != (len(factors),):
        raise ValueError(f"crop_track must have one entry per crop ({len(factors)}), got shape {crop_track.shape}")
    if n_tracks < 0 or (len(crop_track) and (crop_track.min() < 0 or crop_track.max() >= n_tracks)):
        raise ValueError(f"crop_track holds indices outside 0..{n_tracks - 1}")
    active = np.bincount(crop_track, minlength=n_tracks) > 0
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (n_tracks,):
            raise ValueError(f"exclude must have shape ({n_tracks},), got {exclude.shape}")
        active &= ~exclude
    labels = np.full(n_tracks, UNKNOWN, dtype=np.int64)
    tracks = np.flatnonzero(active)
    if len(tracks) == 0:
        return ClusteringResult(labels=labels, n_clusters=0, rounds=0)

    # Per cluster (a track to begin with): sums of its crops' factors, its crop
    # count, and the sums over its tracks of their own pair terms, kept up to date
    # merge by merge. They give its theta and its mean factors (its representative).
    keep = active[crop_track]
    position = np.full(n_tracks, -1, dtype=np.int64)
    position[tracks] = np.arange(len(tracks))
    rows = position[crop_track[keep]]
    u, v = factors.u[keep], factors.v[keep]
    t = len(tracks)
    counts = np.bincount(rows, minlength=t).astype(np.float64)
    sum_u = np.zeros((t, u.shape[1]))
    sum_v = np.zeros((t, v.shape[1]))
    np.add.at(sum_u, rows, u)
    np.add.at(sum_v, rows, v)
    self_terms = np.bincount(rows, weights=np.einsum("ij,ij->i", u, v), minlength=t)
    # A single track's theta: its crop pairs. A larger cluster's: its crop pairs from different
    # tracks, i.e. all pairs less each track's own (the track's sum products and squared counts).
    single_theta = _mean_pair_dissimilarity(factors.offset, sum_u, sum_v, self_terms, counts)
    track_terms = np.einsum("ij,ij->i", sum_u, sum_v)
    track_squares = counts**2

    own_theta = single_theta  # a cluster's threshold while it holds one track

    conflicts = _conflict_pairs(cannot_link, position)
    block = block_rows or _block_rows(t)

    members: list[np.ndarray] = [np.array([i]) for i in range(t)]
    history: list[int] = []
    blocked = 0
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        mean_u, mean_v = sum_u / counts[:, None], sum_v / counts[:, None]
        theta = _cross_track_dissimilarity(factors.offset, sum_u, sum_v, track_terms, counts, track_squares)
        theta = np.where(track_squares == counts**2, own_theta, theta).astype(np.float32)
        rep_u, rep_v = (mean_u, mean_v) if representatives is None else representatives(mean_u, mean_v)
        best, refused = _closest_matches(rep_u, rep_v, factors.offset, theta, conflicts, block, device)
        blocked += refused
        # Pairs of clusters that are each other's closest match merge.
        index = np.arange(len(members))
        found = best >= 0
        mutual = np.zeros(len(members), dtype=bool)
        mutual[found] = best[best[found]] == index[found]
        mutual &= index < best
        if not mutual.any():
            history.append(len(members))
            break
        a, b = index[mutual], best[mutual]
        for i, j in zip(a.tolist(), b.tolist()):
            members[i] = np.concatenate([members[i], members[j]])
        sum_u[a] += sum_u[b]
        sum_v[a] += sum_v[b]
        track_terms[a] += track_terms[b]
        track_squares[a] += track_squares[b]
        counts[a] += counts[b]
        alive = np.ones(len(members), dtype=bool)
        alive[b] = False
        if len(conflicts):
            # Renumber: a merged cluster takes its partner's new number, so whole clusters keep the constraint.
            renumber = np.cumsum(alive) - 1
            renumber[b] = renumber[a]
            conflicts = np.unique(np.sort(renumber[conflicts], axis=1), axis=0)
        members = [m for m, keep_it in zip(members, alive) if keep_it]
        sum_u, sum_v, counts = sum_u[alive], sum_v[alive], counts[alive]
        track_terms, track_squares, own_theta = track_terms[alive], track_squares[alive], own_theta[alive]
        history.append(len(members))
        log.debug("round %d: %d merges, %d clusters", rounds, len(a), len(members))

    # Number clusters by decreasing size, ties by first track.
    order = sorted(range(len(members)), key=lambda c: (-len(members[c]), members[c].min()))
    for label, c in enumerate(order):
        labels[tracks[members[c]]] = label
    return ClusteringResult(
        labels=labels,
        n_clusters=len(members),
        rounds=rounds,
        clusters_per_round=history,
        blocked_merges=blocked,
    )


#: Bytes of one block of dissimilarity rows (float32) that a merge round works on at a time.
BLOCK_BYTES = 32 * 2**20


def _block_rows(n: int) -> int:
    return max(1, min(n, BLOCK_BYTES // (4 * max(n, 1))))


def _closest_matches(
    rep_u: np.ndarray, rep_v: np.ndarray, offset: float, theta: np.ndarray, conflicts: np.ndarray,
    block: int, device: str | None,
) -> tuple[np.ndarray, int]:
    """Each cluster's closest match, computed a block of rows at a time.

    ``S(i, j) = offset + (u_i . v_j + u_j . v_i) / 2`` on the representatives; i and j
    match when ``S < max(theta_i, theta_j)`` and no cannot-link pair joins them.

    Returns:
        (C,) index of each cluster's closest match (-1: none), and how many
        matches cannot-link refused (unordered pairs).
    """
    n = len(rep_u)
    best = np.full(n, -1, dtype=np.int64)
    refused = 0
    product = _Products(rep_u, rep_v, device)
    # Both orientations of every cannot-link pair, sorted by row, so each block takes its slice.
    rows_of_pair = np.concatenate([conflicts[:, 0], conflicts[:, 1]])
    cols_of_pair = np.concatenate([conflicts[:, 1], conflicts[:, 0]])
    order = np.argsort(rows_of_pair, kind="stable")
    rows_of_pair, cols_of_pair = rows_of_pair[order], cols_of_pair[order]
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = product.rows(start, stop)
        s *= 0.5
        s += offset
        match = s < theta[start:stop, None]
        match |= s < theta[None, :]
        match[np.arange(stop - start), np.arange(start, stop)] = False
        inside = slice(*np.searchsorted(rows_of_pair, [start, stop]))
        if inside.stop > inside.start:
            r, c = rows_of_pair[inside] - start, cols_of_pair[inside]
            refused += int(np.count_nonzero(match[r, c]))
            match[r, c] = False
        np.copyto(s, np.inf, where=~match)
        closest = s.argmin(axis=1)
        has = np.isfinite(s[np.arange(stop - start), closest])
        best[start:stop] = np.where(has, closest, -1)
    return best, refused // 2


class _Products:
    """Rows of ``P + P.T`` for ``P = u @ v.T``, in float32, in numpy or on a torch device."""

    def __init__(self, u: np.ndarray, v: np.ndarray, device: str | None) -> None:
        self.device = device
        u = np.ascontiguousarray(u, dtype=np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32)
        if device is None:
            self.u, self.v = u, v
        else:
            import torch

            self.u, self.v = torch.from_numpy(u).to(device), torch.from_numpy(v).to(device)

    def rows(self, start: int, stop: int) -> np.ndarray:
        if stop - start == len(self.u):  # one block: one product and its transpose, exactly symmetric
            p = self.u @ self.v.T
            p = p + p.T
        else:
            p = self.u[start:stop] @ self.v.T
            p += (self.u @ self.v[start:stop].T).T
        return p if self.device is None else p.cpu().numpy()


def _cross_track_dissimilarity(
    offset: float, sum_u: np.ndarray, sum_v: np.ndarray, track_terms: np.ndarray, counts: np.ndarray,
    track_squares: np.ndarray,
) -> np.ndarray:
    """Mean dissimilarity over ordered pairs of crops from different tracks of each cluster.

    Over all ordered crop pairs the bilinear sum is ``sum_u . sum_v``; the pairs
    inside one track add up to that track's ``s_u . s_v`` (``track_terms`` sums
    them over the cluster's tracks), and there are ``n^2 - sum of n_t^2`` pairs
    across tracks. -inf for a cluster of one track (no such pair).
    """
    pairs = counts**2 - track_squares
    total = np.einsum("ij,ij->i", sum_u, sum_v) - track_terms
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = offset + total / pairs
    return np.where(pairs > 0, theta, -np.inf)


def _mean_pair_dissimilarity(
    offset: float, sum_u: np.ndarray, sum_v: np.ndarray, self_terms: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Mean dissimilarity over ordered pairs of distinct items, from the items' factor sums.

    The symmetrised bilinear sum over pairs k != l is ``sum_u . sum_v - sum_k u_k . v_k``.
    A set of one item has no pairs and so no spread: its threshold is -inf (it
    never accepts a neighbour itself, though a neighbour may accept it).
    """
    pairs = counts * (counts - 1)
    total = np.einsum("ij,ij->i", sum_u, sum_v) - self_terms
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = offset + total / pairs
    return np.where(pairs > 0, theta, -np.inf)


def _conflict_pairs(cannot_link: np.ndarray | None, position: np.ndarray) -> np.ndarray:
    """(P, 2) distinct cannot-link pairs between active tracks, as positions, smaller first."""
    if cannot_link is None:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(position)):
        raise ValueError(f"cannot_link holds track indices outside 0..{len(position) - 1}")
    a, b = position[pairs[:, 0]], position[pairs[:, 1]]
    both = (a >= 0) & (b >= 0) & (a != b)
    kept = np.stack([np.minimum(a[both], b[both]), np.maximum(a[both], b[both])], axis=1)
    return np.unique(kept, axis=0) if len(kept) else np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class MovieClusters:
    """Tracks of one movie grouped by identity, with the quality screen that came first.

    Attributes:
        labels: (T,) int64 cluster per track (``0`` the largest), :data:`UNKNOWN`
            for tracks left out: no crops, or low quality.
        track_quality: (T,) mean crop quality per track (NaN: none computed).
        low_quality: (T,) bool, tracks left Unknown as low-quality outliers.
        quality_cut: The movie's quality cut (-inf when quality was not used).
        clustering: What the merge procedure did.
        dissimilarity: Name of the dissimilarity used.
        unknown_reason: (T,) object array, why each Unknown track is Unknown
            (one of :data:`UNKNOWN_REASONS`), None for a clustered track.
    """

    labels: np.ndarray
    track_quality: np.ndarray
    low_quality: np.ndarray
    quality_cut: float
    clustering: ClusteringResult
    dissimilarity: str
    unknown_reason: np.ndarray

    @property
    def n_clusters(self) -> int:
        return self.clustering.n_clusters

    @property
    def n_unknown(self) -> int:
        return int((self.labels == UNKNOWN).sum())


#: Why a track is Unknown: no crop of it reached the clustering (none kept by the crop filters,
#: or none readable), its quality is a low-side outlier of the movie, or the merge procedure left
#: it out for another reason.
UNKNOWN_REASONS = ("no_kept_crops", "low_quality", "not_clustered")


def cluster_movie(
    outputs: np.ndarray,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray | None = None,
    crop_quality: np.ndarray | None = None,
    quality_scatter: float | None = None,
    dissimilarity: Dissimilarity | None = None,
    device: str | None = None,
) -> MovieClusters:
    """The product's clustering of a movie's tracks: quality screen, then the merge procedure.

    Args:
        outputs: (N, D) per-crop model outputs (embeddings for the cosine dissimilarity).
        crop_track: (N,) track index of each crop, in ``0..n_tracks-1``.
        n_tracks: Number of tracks T.
        cannot_link: (P, 2) track index pairs on screen together; None switches
            the constraint off (a faithful reproduction of the paper).
        crop_quality: (N,) per-crop quality (:func:`vcn.identity.quality.embed_and_score`);
            None skips the quality screen.
        quality_scatter: The within-track scatter of crop quality that floors
            the screen's spread (:func:`vcn.identity.quality.within_track_scatter`);
            None measures it on ``crop_quality`` (pass it when these are not the
            crops' own qualities, e.g. track means given to a sample of crops).
        dissimilarity: Default :class:`~vcn.clustering.dissimilarity.CosineDissimilarity`.
        device: Where the merge rounds' matrix products run (:func:`cluster_tracks`).

    Returns:
        Labels per track, why each Unknown track is, and what led to them.
    """
    from vcn.clustering.dissimilarity import CosineDissimilarity
    from vcn.clustering.linkage import cluster_by_negative_cut
    from vcn.identity.quality import low_quality_tracks, track_quality, within_track_scatter

    dissimilarity = dissimilarity or CosineDissimilarity()
    if crop_quality is not None:
        if len(crop_quality) != len(outputs):
            raise ValueError(f"crop_quality has {len(crop_quality)} entries for {len(outputs)} crops")
        quality = track_quality(crop_quality, crop_track, n_tracks)
        if quality_scatter is None:
            quality_scatter = within_track_scatter(crop_quality, crop_track)
        low, cut = low_quality_tracks(quality, crop_scatter=quality_scatter)
    else:
        quality = np.full(n_tracks, np.nan)
        low, cut = np.zeros(n_tracks, dtype=bool), float("-inf")
    factors = dissimilarity.factors(outputs)
    result = None
    if cannot_link is not None:
        # The movie's tracks on screen together give its cut (vcn.clustering.linkage); without
        # enough of them, or with cannot-link off (the paper's setting), the adaptive thresholds decide.
        result = cluster_by_negative_cut(
            factors, crop_track, n_tracks, cannot_link=cannot_link, exclude=None, attach=low,
            representatives=dissimilarity.representative, group=dissimilarity.group_cut,
        )
    if result is None:
        # The paper's rule on the paper's form of the dissimilarity (for the loss metric: as written).
        paper = dissimilarity.paper_form()
        if paper is not dissimilarity:
            factors = paper.factors(outputs)
        result = cluster_tracks(
            factors,
            crop_track,
            n_tracks,
            cannot_link=cannot_link,
            exclude=low,
            representatives=paper.representative,
            device=device,
        )
    has_crops = np.bincount(np.asarray(crop_track, dtype=np.int64), minlength=n_tracks) > 0
    reason = np.full(n_tracks, None, dtype=object)
    unknown = result.labels == UNKNOWN
    reason[unknown] = "not_clustered"
    reason[unknown & low] = "low_quality"
    reason[unknown & ~has_crops] = "no_kept_crops"
    return MovieClusters(
        labels=result.labels,
        track_quality=quality,
        low_quality=low,
        quality_cut=cut,
        clustering=result,
        dissimilarity=dissimilarity.name,
        unknown_reason=reason,
    )
