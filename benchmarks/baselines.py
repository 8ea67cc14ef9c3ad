"""Baseline clusterings the benchmark compares our own clustering against.

Every baseline takes an ``(N, D)`` float matrix of track embeddings, any
scale, and returns an ``int64`` array of ``N`` labels: ``0..K-1`` numbered in
order of first appearance, ``-1`` for noise (DBSCAN and HDBSCAN only). The
customary thresholds below are meant for dlib's ResNet 128-d face descriptors
as dlib and ``face_recognition`` return them, raw (not L2-normalised), where
two faces of one person are typically less than 0.6 apart in Euclidean
distance. ``benchmarks/peers.py`` gives them such raw descriptors;
``benchmarks/cluster_quality.py`` gives them our unit-length track means, on
which the same thresholds are looser.

- **Chinese Whispers** is dlib's own C++ implementation,
  ``dlib.chinese_whispers`` (what ``face_recognition`` users and dlib's
  ``face_clustering.py`` example run). Its Python binding fixes 100 iterations
  and a default-seeded RNG, so it is deterministic and takes no seed. We build
  the threshold graph with numpy and hand dlib the edge list, which gives the
  same labels as ``dlib.chinese_whispers_clustering`` without its quadratic
  loop over ``dlib.vector`` objects.
- **Agglomerative** is scipy's hierarchical clustering on Euclidean distance,
  cut at a distance (``face_recognition``'s tolerance 0.6) or at exactly ``k``
  clusters (the ground-truth number: an oracle, not a fair competitor).
- **DBSCAN** and **HDBSCAN** are scikit-learn's, Euclidean.
- **FINCH** (Sarfraz, Sharma and Stiefelhagen, "Efficient Parameter-free
  Clustering Using First Neighbor Relations", CVPR 2019) is written here from
  the paper's Algorithm 1, with exact nearest neighbours.

``BASELINES`` lists them in the order the benchmark reports them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from scipy import sparse
from scipy.cluster import hierarchy
from scipy.sparse.csgraph import connected_components

#: Rows per block in the pairwise products (a block x N float64 matrix: 8 MB per 1k rows at N = 1k).
_BLOCK = 1024

_LINKAGES = ("single", "complete", "average", "weighted", "centroid", "median", "ward")


def _check_embeddings(x: np.ndarray) -> np.ndarray:
    """Validate an embedding matrix and return it as C-contiguous float64.

    Raises:
        ValueError: when ``x`` is not a 2-D floating array with at least one
            row and one column, or holds NaN or infinity.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"embeddings must be a floating-point array, got dtype {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"embeddings need at least one row and one column, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"embeddings hold {int((~np.isfinite(x)).sum())} non-finite values (NaN or inf)")
    return np.ascontiguousarray(x, dtype=np.float64)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters 0..K-1 in order of first appearance; keep -1 (noise) as is."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(labels.shape, -1, dtype=np.int64)
    clustered = labels >= 0
    _, first, inverse = np.unique(labels[clustered], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    out[clustered] = rank[inverse]
    return out


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on ``n`` vertices, labelled by first appearance."""
    graph = sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _relabel(labels)


def _threshold_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``i < j`` with Euclidean distance below ``threshold`` (blockwise, memory O(block x N))."""
    sq_norms = np.einsum("ij,ij->i", x, x)
    rows, cols = [], []
    for start in range(0, len(x), _BLOCK):
        block = x[start : start + _BLOCK]
        sq_dist = sq_norms[start : start + _BLOCK, None] + sq_norms[None, :] - 2.0 * (block @ x.T)
        i, j = np.nonzero(sq_dist < threshold * threshold)
        i += start
        upper = j > i
        rows.append(i[upper])
        cols.append(j[upper])
    return np.concatenate(rows), np.concatenate(cols)


def chinese_whispers(x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Chinese Whispers on the graph of pairs closer than ``threshold`` (dlib's implementation).

    An edge joins every pair of embeddings at Euclidean distance below
    ``threshold``, plus a self-loop per point, exactly the graph
    ``dlib.chinese_whispers_clustering`` builds; dlib's ``chinese_whispers``
    then propagates labels for its fixed 100 iterations (``100 * N`` updates
    of randomly drawn points) with a default-seeded RNG. The binding exposes
    neither the iteration count nor the seed, so the result is deterministic,
    and it equals ``dlib.chinese_whispers_clustering`` (up to float rounding
    of a distance exactly at the threshold).

    Args:
        x: ``(N, D)`` embeddings.
        threshold: Edge distance. dlib's ``face_clustering.py`` example uses
            0.5 for its ResNet descriptors; ``face_recognition`` uses 0.6 as a
            same-person tolerance. Larger values chain identities together.

    Returns:
        ``(N,)`` int64 labels, no noise label.

    Raises:
        ValueError: on invalid embeddings or a non-positive threshold.
    """
    import dlib

    x = _check_embeddings(x)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    rows, cols = _threshold_pairs(x, threshold)
    # A self-loop per point, as dlib's own graph has: it keeps isolated points in the graph
    # (dlib labels only vertices up to the largest index in an edge) and counts a point's own label in its vote.
    self_loops = np.arange(len(x))
    edges = list(zip(np.concatenate([self_loops, rows]).tolist(), np.concatenate([self_loops, cols]).tolist()))
    return _relabel(np.asarray(dlib.chinese_whispers(edges)))


def agglomerative(x: np.ndarray, distance: float = 0.6, linkage: str = "average") -> np.ndarray:
    """Hierarchical agglomerative clustering on Euclidean distance, cut at ``distance``.

    Two clusters stay merged when their linkage distance is at most
    ``distance`` (scipy's ``fcluster(..., criterion="distance")``).

    Args:
        x: ``(N, D)`` embeddings.
        distance: Cut height. 0.6 is ``face_recognition``'s same-person
            tolerance for dlib's descriptors; with average linkage it bounds
            the mean distance between the members of two merged clusters.
        linkage: scipy linkage method (``"average"``, ``"complete"``,
            ``"single"``, ``"ward"``, ...).

    Returns:
        ``(N,)`` int64 labels, no noise label.

    Raises:
        ValueError: on invalid embeddings, a negative distance or an unknown linkage.
    """
    x = _check_embeddings(x)
    if not distance >= 0:
        raise ValueError(f"distance must be non-negative, got {distance}")
    tree = _linkage_tree(x, linkage)
    if tree is None:
        return np.zeros(1, dtype=np.int64)
    return _relabel(hierarchy.fcluster(tree, t=distance, criterion="distance"))


def agglomerative_k(x: np.ndarray, k: int, linkage: str = "average") -> np.ndarray:
    """Hierarchical agglomerative clustering stopped at exactly ``k`` clusters.

    **Uses ground truth:** ``k`` is the true number of identities, which a real
    user does not know; this is an oracle upper bound for agglomerative
    clustering, not a competitor. The partition is the one the algorithm holds
    after its first ``N - k`` merges, so it has exactly ``k`` clusters even
    when merge heights tie (where ``fcluster(..., "maxclust")`` can give fewer).

    Args:
        x: ``(N, D)`` embeddings.
        k: Number of clusters, ``1 <= k <= N``.
        linkage: scipy linkage method.

    Returns:
        ``(N,)`` int64 labels in ``0..k-1``.

    Raises:
        ValueError: on invalid embeddings, ``k`` out of range or an unknown linkage.
    """
    x = _check_embeddings(x)
    n = len(x)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, N={n}], got {k!r}")
    tree = _linkage_tree(x, linkage)
    if tree is None:
        return np.zeros(1, dtype=np.int64)
    # Replay the first N - k merges: merge m joins nodes tree[m, :2] into node N + m.
    merges = tree[: n - k, :2].astype(np.int64)
    parents = n + np.arange(n - k)
    labels = _components(2 * n - k, np.concatenate([merges[:, 0], merges[:, 1]]), np.concatenate([parents, parents]))
    return _relabel(labels[:n])


def _linkage_tree(x: np.ndarray, linkage: str) -> np.ndarray | None:
    """scipy's linkage matrix on Euclidean distance, or None for a single point."""
    if linkage not in _LINKAGES:
        raise ValueError(f"linkage must be one of {_LINKAGES}, got {linkage!r}")
    if len(x) == 1:
        return None
    return hierarchy.linkage(x, method=linkage, metric="euclidean")


def dbscan(x: np.ndarray, eps: float = 0.5, min_samples: int = 5) -> np.ndarray:
    """scikit-learn's DBSCAN on Euclidean distance.

    Args:
        x: ``(N, D)`` embeddings.
        eps: Neighbourhood radius; 0.5 sits inside dlib's 0.6 same-person tolerance.
        min_samples: Points (itself included) within ``eps`` for a core point;
            5 is scikit-learn's default. Identities seen in fewer tracks become noise.

    Returns:
        ``(N,)`` int64 labels, ``-1`` for noise.

    Raises:
        ValueError: on invalid embeddings or parameters (scikit-learn checks the latter).
    """
    from sklearn.cluster import DBSCAN

    x = _check_embeddings(x)
    if len(x) == 1:
        return np.zeros(1, dtype=np.int64)
    return _relabel(DBSCAN(eps=eps, min_samples=min_samples, metric="euclidean").fit_predict(x))


def hdbscan(x: np.ndarray, min_cluster_size: int = 2) -> np.ndarray:
    """scikit-learn's HDBSCAN on Euclidean distance, other parameters at their defaults.

    Args:
        x: ``(N, D)`` embeddings.
        min_cluster_size: Smallest cluster kept; 2 lets an identity seen in
            two tracks form a cluster. ``min_samples`` defaults to it.

    Returns:
        ``(N,)`` int64 labels, ``-1`` for noise.

    Raises:
        ValueError: on invalid embeddings or parameters (scikit-learn checks the latter).
    """
    from sklearn.cluster import HDBSCAN

    x = _check_embeddings(x)
    if len(x) == 1:
        return np.zeros(1, dtype=np.int64)
    # copy=True only silences scikit-learn 1.9's FutureWarning; it does not change the labels.
    return _relabel(HDBSCAN(min_cluster_size=min_cluster_size, metric="euclidean", copy=True).fit_predict(x))


def _first_neighbours(x: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row (exact, blockwise; ties to the lowest index)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.maximum(norms, np.finfo(np.float64).tiny)
    neighbours = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), _BLOCK):
        sim = unit[start : start + _BLOCK] @ unit.T
        rows = np.arange(len(sim))
        sim[rows, start + rows] = -np.inf
        neighbours[start : start + _BLOCK] = sim.argmax(axis=1)
    return neighbours


def finch(x: np.ndarray) -> list[np.ndarray]:
    """FINCH: every partition of the first-neighbour merge hierarchy, finest first.

    From the paper (Sarfraz et al., CVPR 2019): each point's first neighbour
    ``κ_i`` is its most cosine-similar other point; points ``i`` and ``j`` are
    linked when ``j = κ_i``, ``κ_j = i`` or ``κ_i = κ_j``; the connected
    components are the first partition. Each later partition repeats this on
    the clusters' mean vectors (means of the original embeddings of their
    members) and merges the clusters whose means are linked. Every cluster of
    two or more items has a first neighbour, so each step at least halves the
    cluster count; the recursion stops at a single cluster, which is then the
    last partition. Parameter-free; exact neighbours, O(N^2 D) time for the
    first step.

    Args:
        x: ``(N, D)`` embeddings (their norms do not matter: cosine similarity).

    Returns:
        One ``(N,)`` int64 label array per level over the original points,
        finest first, each strictly coarser than the one before. A single
        point gives ``[array([0])]``.

    Raises:
        ValueError: on invalid embeddings.
    """
    x = _check_embeddings(x)
    labels = np.arange(len(x))
    points = x
    partitions: list[np.ndarray] = []
    while len(points) > 1:
        # Linking i to κ_i gives the same components as the paper's three-way adjacency:
        # κ_i = κ_j joins i and j through their shared neighbour.
        kappa = _first_neighbours(points)
        merged = _components(len(points), np.arange(len(points)), kappa)
        labels = merged[labels]
        partitions.append(labels)
        n_clusters = int(merged.max()) + 1
        # Mean of the original embeddings in each new cluster.
        points = np.zeros((n_clusters, x.shape[1]))
        np.add.at(points, labels, x)
        points /= np.bincount(labels, minlength=n_clusters)[:, None]
    return partitions or [labels]


def finch_first(x: np.ndarray) -> np.ndarray:
    """FINCH's first (finest) partition: the components of the first-neighbour graph."""
    return finch(x)[0]


def finch_last(x: np.ndarray) -> np.ndarray:
    """FINCH's coarsest informative partition.

    The hierarchy usually ends in a single cluster, which says nothing; like
    the FINCH paper's reporting, this returns the coarsest partition with more
    than one cluster in that case. When the first partition is already a single
    cluster (e.g. N <= 3), that single cluster is returned.
    """
    partitions = finch(x)
    if len(partitions) > 1 and partitions[-1].max() == 0:
        return partitions[-2]
    return partitions[-1]


class Baseline(NamedTuple):
    """One row of the benchmark's baseline table."""

    name: str
    description: str
    uses_ground_truth: bool
    run: Callable[[np.ndarray, int], np.ndarray]
    """Takes the embeddings and the true number of identities (ignored unless ``uses_ground_truth``)."""


BASELINES: list[Baseline] = [
    Baseline(
        "Chinese Whispers (0.5)",
        "dlib.chinese_whispers on edges at Euclidean distance < 0.5 (dlib's face_clustering example), 100 iterations",
        False,
        lambda x, k_true: chinese_whispers(x, threshold=0.5),
    ),
    Baseline(
        "Agglomerative average (0.6)",
        "scipy average-linkage agglomerative clustering, Euclidean, cut at distance 0.6 (face_recognition tolerance)",
        False,
        lambda x, k_true: agglomerative(x, distance=0.6, linkage="average"),
    ),
    Baseline(
        "DBSCAN (eps 0.5)",
        "scikit-learn DBSCAN, Euclidean, eps=0.5, min_samples=5 (scikit-learn default); noise stays -1",
        False,
        lambda x, k_true: dbscan(x, eps=0.5, min_samples=5),
    ),
    Baseline(
        "HDBSCAN (min size 2)",
        "scikit-learn HDBSCAN, Euclidean, min_cluster_size=2, other parameters default; noise stays -1",
        False,
        lambda x, k_true: hdbscan(x, min_cluster_size=2),
    ),
    Baseline(
        "FINCH first partition",
        "FINCH (Sarfraz et al. 2019), cosine first neighbours, exact; finest partition",
        False,
        lambda x, k_true: finch_first(x),
    ),
    Baseline(
        "FINCH last partition",
        "FINCH (Sarfraz et al. 2019), cosine first neighbours, exact; coarsest partition with more than one cluster",
        False,
        lambda x, k_true: finch_last(x),
    ),
    Baseline(
        "Agglomerative at true k (uses ground truth)",
        "scipy average-linkage agglomerative clustering, Euclidean, stopped at the true number of identities",
        True,
        lambda x, k_true: agglomerative_k(x, k_true, linkage="average"),
    ),
]
