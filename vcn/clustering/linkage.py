"""Average-linkage clustering of tracks under cannot-link constraints, cut at a distance.

Average linkage (UPGMA) merges, one pair at a time, the two clusters whose tracks
are closest on average; every track weighs the same. Two clusters holding a pair
of tracks that are on screen together are never merged, two clusters of
:data:`GROUP_SIZE` or more tracks each only below the stricter group cut, and the
merging stops when the closest admissible pair is no closer than the cut. The dissimilarity is
bilinear (:mod:`vcn.clustering.dissimilarity`), so the mean over all track pairs of
two clusters is the dissimilarity of their mean factors: a cluster is one pair of
mean vectors, and memory is O(T K) for T tracks of K-wide factors, never a (T, T)
matrix (which at 16,000 tracks, a 2-hour film of our test footage, is 1 GiB).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from vcn.clustering.dissimilarity import Factors
from vcn.clustering.parameter_free import UNKNOWN, ClusteringResult


def average_linkage(
    points: Factors,
    cut: float,
    *,
    cannot_link: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    group_cut: float | None = None,
) -> np.ndarray:
    """Average-linkage clusters of T items, merged while closer than ``cut`` and never across a cannot-link pair.

    The items are points of a bilinear dissimilarity (one row of ``points`` each, e.g. the track
    representatives of :func:`track_points`); a plain (T, T) matrix ``D`` is the points
    ``Factors(u=np.eye(T), v=D, offset=0)``. A cluster is its items' mean factors, whose
    dissimilarity to another cluster is the mean over all their item pairs, so no (T, T) matrix is
    ever held: memory is O(T K). The merges are found by the nearest-neighbour chain, which for a
    reducible linkage like this one (cannot-link included: a merged cluster is at least as far from a
    third as the nearer of its parts) makes exactly the merges of merging the closest pair first;
    a chain whose nearest neighbour is at ``cut`` or farther never merges again and is set aside.

    Args:
        points: (T, K) factors of the items.
        cut: Merging stops when the closest admissible pair of clusters is at ``cut`` or farther.
        cannot_link: (P, 2) item pairs never to share a cluster.
        exclude: (T,) bool, items left out (labelled :data:`UNKNOWN`).
        group_cut: A stricter cut for two clusters that each hold at least :data:`GROUP_SIZE` items:
            such a pair at ``group_cut`` or farther never merges (it is refused as a cannot-link pair
            is, which keeps the linkage reducible). None: ``cut`` for every pair.

    Returns:
        (T,) int64 labels ``0..C-1`` numbered by decreasing cluster size (ties by first item),
        :data:`UNKNOWN` for excluded items.
    """
    n = len(points)
    keep = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    if keep.shape != (n,):
        raise ValueError(f"exclude must have one entry per item ({n}), got shape {keep.shape}")
    # A pair that may never merge: a merged cluster inherits every constraint of either part.
    blocked: list[set[int]] = [set() for _ in range(n)]
    if cannot_link is not None and len(cannot_link):
        pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
        if pairs.min() < 0 or pairs.max() >= n:
            raise ValueError(f"cannot_link holds indices outside 0..{n - 1}")
        for a, b in pairs.tolist():
            if a != b:
                blocked[a].add(b)
                blocked[b].add(a)
    size = keep.astype(np.float64)
    parent = np.arange(n)
    open_ = keep.copy()  # clusters that may still merge
    # The open clusters' mean factors (float64), one row each: ``rows`` names the cluster of each row and
    # ``position`` the row of each cluster. Repacked when half of the rows have merged or been set aside.
    rows = np.flatnonzero(open_)
    packed_u = np.asarray(points.u, dtype=np.float64)[rows]
    packed_v = np.asarray(points.v, dtype=np.float64)[rows]
    position = np.full(n, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    alive = np.ones(len(rows), dtype=bool)
    todo = iter(rows.tolist())
    chain: list[int] = []
    while True:
        if not chain:
            a = next((i for i in todo if open_[i]), None)
            if a is None:
                break
            chain.append(a)
        a = chain[-1]
        d = points.offset + 0.5 * (packed_u @ packed_v[position[a]] + packed_v @ packed_u[position[a]])
        d[~alive] = np.inf
        d[position[a]] = np.inf
        if blocked[a]:
            shut = position[list(blocked[a])]
            d[shut[shut >= 0]] = np.inf
        j = int(d.argmin())
        b, distance = int(rows[j]), float(d[j])
        # A tie goes to the cluster the chain came from. The tolerance covers the last-bit difference between
        # a pair's distance seen from either side (two matrix-vector products), which could otherwise close
        # the chain into a cycle.
        if len(chain) > 1 and d[position[chain[-2]]] <= distance + 1e-9 * max(1.0, abs(distance)):
            b, distance = chain[-2], float(d[position[chain[-2]]])
        if len(chain) > n:
            raise RuntimeError("the nearest-neighbour chain of the average linkage did not close")
        if (
            group_cut is not None
            and group_cut <= distance < cut
            and min(size[a], size[b]) >= GROUP_SIZE
        ):
            # Two groups of tracks no closer than the group cut: refused for good, as a cannot-link pair.
            blocked[a].add(b)
            blocked[b].add(a)
            if len(chain) > 1 and b == chain[-2]:
                chain.pop()
        elif not distance < cut:
            # Every link of the chain is at least this far: none of its clusters will merge again.
            for c in chain:
                open_[c] = False
                alive[position[c]] = False
            chain.clear()
        elif len(chain) > 1 and b == chain[-2]:
            chain.pop()
            chain.pop()
            # Merge b into a.
            total = size[a] + size[b]
            pa, pb = position[a], position[b]
            packed_u[pa] = (size[a] * packed_u[pa] + size[b] * packed_u[pb]) / total
            packed_v[pa] = (size[a] * packed_v[pa] + size[b] * packed_v[pb]) / total
            size[a], size[b] = total, 0.0
            parent[b] = a
            open_[b] = False
            alive[pb] = False
            for c in blocked[b]:
                blocked[c].discard(b)
                blocked[c].add(a)
            blocked[a] |= blocked[b]
            blocked[b] = set()
        else:
            chain.append(b)
        if alive.sum() * 2 < len(alive) and len(alive) > 64:
            position[rows] = -1
            rows, packed_u, packed_v = rows[alive], packed_u[alive], packed_v[alive]
            position[rows] = np.arange(len(rows))
            alive = np.ones(len(rows), dtype=bool)
    # Each item's cluster is the root of its chain of merges.
    while True:
        above = parent[parent]
        if np.array_equal(above, parent):
            break
        parent = above
    return _number_by_size(parent, keep)


def _number_by_size(parent: np.ndarray, keep: np.ndarray) -> np.ndarray:
    labels = np.full(len(parent), UNKNOWN, dtype=np.int64)
    roots = parent[keep]
    if not len(roots):
        return labels
    uniq, first, counts = np.unique(roots, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    number = np.empty(len(uniq), dtype=np.int64)
    number[order] = np.arange(len(uniq))
    labels[keep] = number[np.searchsorted(uniq, roots)]
    return labels


#: The cut is this quantile of the distances between tracks known to be different people. Swept over
#: 0.05-0.5 on six embedding sets (benchmarks/results/cluster_rules.md), BCubed F stays within about 2
#: points of its best from 0.15 to 0.3 on all but one, and 0.25 keeps PCR in [0.9, 1.3] on the
#: development episodes (more clusters than people below it, merged people above). (Swept with the quantile read
#: as an order statistic of the pairs, before :func:`negative_cut` fitted a normal to them.)
NEGATIVE_QUANTILE = 0.25
#: Two clusters of :data:`GROUP_SIZE` or more tracks each merge only below this quantile of the same
#: distances. Their mean distance is about the mean distance of their people, and the lower quartile of the
#: tracks on screen together (mostly the main characters') lies above that of some pairs of people who never
#: share the screen, so cannot-link cannot refuse them: on a held-out episode of dev-mv's kind 11 of 91 pairs
#: of people, merged in full (benchmarks/results/cut_mechanism.md). Merges that move a few tracks keep the
#: quartile. On nine saved SFace embedding sets (development and held-out episodes, pretrained and adapted)
#: no set is worse for it, dev-ep +4.6 BCubed F, that held-out episode +5.9 (+11.4 when the quantiles were
#: order statistics); over 5-12 tracks and 0.1-0.15 none falls below the rule without it
#: (benchmarks/results/group_cut.md). Cosine only
#: (:attr:`vcn.clustering.dissimilarity.Dissimilarity.group_cut`).
GROUP_QUANTILE = 0.1
#: Two clusters that each hold at least this many tracks merge only below the group cut.
GROUP_SIZE = 8
#: Fewer known different-person pairs than this give no cut (the quantile would be noise).
MIN_NEGATIVES = 10


def negative_cut(points: Factors, negatives: np.ndarray | None, quantile: float = NEGATIVE_QUANTILE) -> float | None:
    """The movie's own cut: :data:`NEGATIVE_QUANTILE` of the distances of its known different-person pairs,
    read from a normal distribution fitted to them (their mean plus the quantile's z-score times their
    standard deviation).

    Tracks on screen together are two people, so their distances sample how far
    apart different people are for this model on this movie (measured on the
    development episodes: their quantiles match those of all different-person
    pairs within 0.025, for the dlib ResNet and SFace alike, whose distance scales
    differ tenfold). A fixed quantile of that sample is a cut in the model's own
    units, with no threshold to tune per model or per finetuned checkpoint.

    The fit reads the quantile from every pair, not from the one or two order statistics near it. On a
    short movie's few pairs that steadies the cut (28-30 pairs on the end-to-end benchmark movies: the
    group cut's bootstrap spread 0.037-0.045 against 0.056-0.082 for the order statistic), and where a few
    pairs on screen together are much closer than the rest (people who look alike; a long lower tail) it
    widens the spread and lowers the cut, which keeps look-alikes who never share the screen apart too.
    Measured against the order statistic on eleven saved embedding sets: the same clusters on six, a
    held-out episode of dev-mv's kind +4.3 BCubed F (a merge of two people undone), two others +0.7 and
    +0.8, dev-mv -0.7 (PCR 1.27 -> 1.20) (benchmarks/results/cut_levers.md).

    Args:
        points: The tracks' factors (:func:`track_points`).
        negatives: (P, 2) track pairs known to be different people.
        quantile: Default :data:`NEGATIVE_QUANTILE`; :data:`GROUP_QUANTILE` gives the group cut.

    Returns:
        The cut, or None with fewer than :data:`MIN_NEGATIVES` distinct pairs.
    """
    values = negative_distances(points, negatives)
    if values is None:
        return None
    return float(values.mean() + NormalDist().inv_cdf(quantile) * values.std(ddof=1))


def negative_distances(points: Factors, negatives: np.ndarray | None) -> np.ndarray | None:
    """(P,) distances of the distinct pairs among ``negatives`` (each pair once, in either order, none of
    a track with itself); None with fewer than :data:`MIN_NEGATIVES` of them."""
    if negatives is None or len(negatives) == 0:
        return None
    pairs = np.unique(np.sort(np.asarray(negatives, dtype=np.int64).reshape(-1, 2), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if len(pairs) < MIN_NEGATIVES:
        return None
    return pair_distances(points, pairs)


#: The cut never exceeds the reach of the movie's own same-person distances: the mean of the same-person
#: component of the track pairs' distances plus this many of its standard deviations (for a normal, 1 in
#: 30,000 pairs beyond it). On a track dataset of degraded photos one person's tracks spread as wide as
#: the quartile of different people (the reach lies above the cut on every saved trackset embedding set:
#: no change); in a movie they sit close together (same-person median 0.21-0.36 on the end-to-end
#: benchmark movies against a cut of 0.72-0.87) and the quartile of the main characters' pairs on screen
#: together let two minor characters of 3 tracks each merge at 0.71-0.82. Measured in
#: benchmarks/results/cut_levers.md (lever "no same-person reach").
SAME_PERSON_SDS = 4.0
#: The mixture is fitted on all track pairs up to this many, on a seeded sample of them beyond.
MIXTURE_PAIRS = 200_000


def same_person_reach(points: Factors, negatives: np.ndarray | None) -> float | None:
    """How far apart two tracks of one person reach in this movie, for the cut to stay under.

    The distances of all track pairs are a mixture of same-person and different-person pairs; the
    different-person component is the normal fitted to the pairs on screen together (as in
    :func:`negative_cut`), and EM fits the same-person component (a normal) and its share. The reach is
    that component's mean plus :data:`SAME_PERSON_SDS` standard deviations.

    Args:
        points: The tracks' factors (:func:`track_points`).
        negatives: (P, 2) track pairs known to be different people.

    Returns:
        The reach, or None with fewer than :data:`MIN_NEGATIVES` distinct pairs or when no same-person
        component separates from the different-person one.
    """
    negative = negative_distances(points, negatives)
    if negative is None:
        return None
    mu, sd = float(negative.mean()), float(negative.std(ddof=1))
    if sd <= 0:
        return None
    n = len(points.u)
    if n * (n - 1) // 2 <= MIXTURE_PAIRS:
        every = np.stack(np.triu_indices(n, 1), axis=1)
    else:
        rng = np.random.default_rng(0)
        a, b = rng.integers(0, n, size=(2, MIXTURE_PAIRS))
        every = np.stack([a, b], axis=1)[a != b]
    d = pair_distances(points, every)

    def density(x: np.ndarray, mean: float, spread: float) -> np.ndarray:
        return np.exp(-0.5 * ((x - mean) / spread) ** 2) / spread

    share, mean, spread = 0.1, float(np.quantile(d, 0.02)), sd
    different = density(d, mu, sd)
    for _ in range(500):
        same = share * density(d, mean, spread)
        weight = same / np.maximum(same + (1 - share) * different, 1e-300)
        total = weight.sum()
        if total <= 0:
            return None
        previous = (share, mean, spread)
        share = float(total / len(d))
        mean = float((weight * d).sum() / total)
        spread = float(np.sqrt((weight * (d - mean) ** 2).sum() / total))
        if spread <= 1e-6:
            return None
        if max(abs(x - y) for x, y in zip(previous, (share, mean, spread))) < 1e-7:
            break
    if not mean < mu:
        return None
    return mean + SAME_PERSON_SDS * spread


def pair_distances(points: Factors, pairs: np.ndarray) -> np.ndarray:
    """(P,) float64 dissimilarities of the given (P, 2) pairs of points."""
    a, b = np.asarray(pairs, dtype=np.int64).reshape(-1, 2).T
    forward = np.einsum("ij,ij->i", points.u[a], points.v[b], dtype=np.float64)
    backward = np.einsum("ij,ij->i", points.v[a], points.u[b], dtype=np.float64)
    return points.offset + 0.5 * (forward + backward)


def track_points(factors: Factors, crop_track: np.ndarray, tracks: np.ndarray, representatives) -> Factors:
    """The representatives of the given tracks' crops, one row per track: what the linkage clusters.

    Args:
        factors: :class:`vcn.clustering.dissimilarity.Factors` of every crop.
        crop_track: (N,) track of each crop.
        tracks: Track indices (each with at least one crop).
        representatives: :meth:`vcn.clustering.dissimilarity.Dissimilarity.representative`.
    """
    rep_u, rep_v = _track_representatives(factors, np.asarray(crop_track, dtype=np.int64), tracks, representatives)
    return Factors(u=rep_u, v=rep_v, offset=factors.offset)


def _between(a_u: np.ndarray, a_v: np.ndarray, b_u: np.ndarray, b_v: np.ndarray, offset: float) -> np.ndarray:
    """(len(a), len(b)) float32 dissimilarities between two sets of representatives (their left and right factors)."""
    block = a_u @ b_v.T
    block += a_v @ b_u.T
    block *= 0.5
    block += offset
    return block


def _track_representatives(
    factors: Factors, crop_track: np.ndarray, tracks: np.ndarray, representatives
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (len(tracks), K) left and right factors of each given track's representative."""
    position = np.full(int(crop_track.max(initial=-1)) + 1, -1, dtype=np.int64)
    position[tracks] = np.arange(len(tracks))
    rows = position[crop_track]
    keep = rows >= 0
    counts = np.bincount(rows[keep], minlength=len(tracks)).astype(np.float64)[:, None]
    sum_u = np.zeros((len(tracks), factors.u.shape[1]))
    sum_v = np.zeros((len(tracks), factors.v.shape[1]))
    np.add.at(sum_u, rows[keep], factors.u[keep])
    np.add.at(sum_v, rows[keep], factors.v[keep])
    rep_u, rep_v = representatives(sum_u / counts, sum_v / counts)
    return np.asarray(rep_u, dtype=np.float32), np.asarray(rep_v, dtype=np.float32)


def attach_to_clusters(
    factors: Factors,
    crop_track: np.ndarray,
    labels: np.ndarray,
    candidates: np.ndarray,
    cut: float,
    cannot_link: np.ndarray,
    representatives,
) -> np.ndarray:
    """Candidate tracks join the finished cluster they are nearest to, if that is within ``cut``.

    A track joins the cluster whose average distance to it (the distance average
    linkage merges by) is smallest and below ``cut``, unless the cluster holds a
    track on screen with it. The candidates never shape a cluster: they are
    judged one at a time against the clusters the other tracks made, the nearest
    first, and one that joins a cluster keeps the tracks on screen with it out.

    Args:
        factors: Factors of every crop.
        crop_track: (N,) track of each crop.
        labels: (T,) clusters of the other tracks, :data:`UNKNOWN` for the candidates and tracks left out.
        candidates: Track indices that may join (each with crops, each :data:`UNKNOWN` in ``labels``).
        cut: The clustering's cut.
        cannot_link: (P, 2) track pairs on screen together.
        representatives: As :func:`track_points`.

    Returns:
        (T,) labels with the candidates that joined a cluster in it.
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    candidates = np.asarray(candidates, dtype=np.int64)
    clustered = np.flatnonzero(labels != UNKNOWN)
    if not len(candidates) or not len(clustered):
        return labels
    n_clusters = int(labels.max()) + 1
    everyone = np.concatenate([candidates, clustered])
    rep_u, rep_v = _track_representatives(factors, np.asarray(crop_track, dtype=np.int64), everyone, representatives)
    cand_u, cand_v = rep_u[: len(candidates)], rep_v[: len(candidates)]
    clus_u, clus_v = rep_u[len(candidates) :], rep_v[len(candidates) :]
    from scipy.sparse import csr_matrix

    sizes = np.bincount(labels[clustered], minlength=n_clusters).astype(np.float64)
    member = csr_matrix(
        (np.ones(len(clustered)), (np.arange(len(clustered)), labels[clustered])), shape=(len(clustered), n_clusters)
    )
    # Average distance of each candidate to each cluster, a block of candidates at a time.
    mean = np.empty((len(candidates), n_clusters))
    step = max(1, (32 << 20) // (4 * len(clustered)))
    for start in range(0, len(candidates), step):
        stop = min(len(candidates), start + step)
        block = _between(cand_u[start:stop], cand_v[start:stop], clus_u, clus_v, factors.offset)
        mean[start:stop] = (member.T @ block.T.astype(np.float64)).T / sizes
    # Clusters each candidate may not join: those holding a track on screen with it.
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    partners: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    row_of = {int(t): i for i, t in enumerate(candidates)}
    for t, i in row_of.items():
        blocked = [labels[u] for u in partners.get(t, ()) if labels[u] != UNKNOWN]
        mean[i, blocked] = np.inf
    # Nearest first; a join blocks that cluster for the candidates on screen with the one that joined.
    while True:
        i, c = np.unravel_index(np.argmin(mean), mean.shape)
        if not mean[i, c] < cut:
            break
        t = int(candidates[i])
        labels[t] = c
        mean[i, :] = np.inf
        for u in partners.get(t, ()):
            if u in row_of:
                mean[row_of[u], c] = np.inf
    return labels


def cluster_by_negative_cut(
    factors: Factors,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray,
    exclude: np.ndarray | None,
    representatives,
    attach: np.ndarray | None = None,
    group: bool = True,
) -> ClusteringResult | None:
    """Tracks clustered by constrained average linkage cut at :func:`negative_cut` (at most
    :func:`same_person_reach`), with the group cut at :data:`GROUP_QUANTILE` of the same distances for two
    clusters of :data:`GROUP_SIZE` or more tracks each; None when the movie has too few tracks on screen
    together to give a cut.

    Args: as :func:`vcn.clustering.parameter_free.cluster_tracks` (``cannot_link`` required: it is both the
    constraint and the sample of different-person distances), and
        attach: (T,) bool, tracks kept out of the linkage and of the cut that afterwards join the cluster
            they are within the cut of (:func:`attach_to_clusters`), e.g. low-quality tracks: they may
            join a person's cluster, but never make one or bridge two.
        group: Whether the group cut and the same-person reach apply (the cosine's safeguards,
            :attr:`vcn.clustering.dissimilarity.Dissimilarity.group_cut`); off, every merge is at the cut.

    Returns:
        A :class:`vcn.clustering.parameter_free.ClusteringResult` (``rounds``: merges made), or None.
    """
    crop_track = np.asarray(crop_track, dtype=np.int64)
    if crop_track.shape != (len(factors),):
        raise ValueError(f"crop_track must have one entry per crop ({len(factors)}), got shape {crop_track.shape}")
    if len(crop_track) and (crop_track.min() < 0 or crop_track.max() >= n_tracks):
        raise ValueError(f"crop_track holds indices outside 0..{n_tracks - 1}")
    active = np.bincount(crop_track, minlength=n_tracks) > 0
    if exclude is not None:
        active &= ~np.asarray(exclude, dtype=bool)
    joining = np.zeros(n_tracks, dtype=bool)
    if attach is not None:
        joining = active & np.asarray(attach, dtype=bool)
        active &= ~joining
    tracks = np.flatnonzero(active)
    position = np.full(n_tracks, -1, dtype=np.int64)
    position[tracks] = np.arange(len(tracks))
    pairs = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n_tracks):
        raise ValueError(f"cannot_link holds track indices outside 0..{n_tracks - 1}")
    pairs = position[pairs]
    pairs = pairs[(pairs >= 0).all(axis=1)]
    if len(tracks) < 2:
        return None
    points = track_points(factors, crop_track, tracks, representatives)
    cut = negative_cut(points, pairs)
    if cut is None:
        return None
    reach = same_person_reach(points, pairs) if group else None
    if reach is not None:
        cut = min(cut, reach)
    group_cut = min(cut, negative_cut(points, pairs, GROUP_QUANTILE)) if group else None
    local = average_linkage(points, cut, cannot_link=pairs, group_cut=group_cut)
    labels = np.full(n_tracks, UNKNOWN, dtype=np.int64)
    labels[tracks] = local
    n_clusters = int(local.max()) + 1 if len(local) else 0
    if joining.any():
        before = labels
        labels = attach_to_clusters(
            factors, crop_track, labels, np.flatnonzero(joining), cut, cannot_link, representatives
        )
        attached = int((labels != before).sum())
    else:
        attached = 0
    return ClusteringResult(
        labels=labels, n_clusters=n_clusters, rounds=len(tracks) - n_clusters, rule="negative-cut", cut=cut,
        group_cut=group_cut, same_person_reach=reach, attached=attached,
    )
