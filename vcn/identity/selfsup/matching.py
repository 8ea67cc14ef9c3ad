"""Coarse track matching between training rounds: one Gaussian per track.

After a round of self-distillation the tracks are embedded again, and each
track's crops are summarised by a Gaussian. Track ``u`` matches track ``t`` when
the mean of ``u`` is at least as likely under ``t``'s Gaussian as ``t``'s own
least typical crops (DESIGN.md section 2):

    logpdf_t(mean_u) >= theta_t,  theta_t = log(mean pdf_t of t's lowest-25 % crops).

Matches only make training pairs for the next round (:class:`~vcn.identity.selfsup.pairs.PairSampler`);
nothing is merged here, so a coarse test that errs on either side costs little.

Two things make the Gaussians usable although a track has far fewer crops than
the embedding has dimensions (128-512):

* They live in a low-dimensional PCA basis fitted on all crops (32 dimensions by
  default), where most of the variance between faces is and where a covariance
  needs ~500 numbers, not ~100,000.
* Each track's covariance is shrunk towards the pooled within-track covariance
  (what crops of one face typically spread like), with the Ledoit-Wolf
  closed-form intensity and a floor that grows as the track gets shorter; a
  one-crop track gets the pooled covariance outright.

Everything is computed in log-densities, which in 32 dimensions span hundreds of
nats, and all track means are scored under all Gaussians in blocks of BLAS
matrix products, so 5,000 tracks take seconds and bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Largest number of float64 elements in one temporary array (64 MiB).
_BLOCK_ELEMENTS = 1 << 23
#: Relative ridge added to the pooled covariance so that every covariance is positive definite.
_RIDGE = 1e-9


@dataclass(frozen=True)
class TrackGaussians:
    """One Gaussian per track, in a shared (PCA) basis. Build with :func:`fit_track_gaussians`.

    Attributes:
        centre: (D,) mean of all crop embeddings, subtracted before projecting.
        basis: (D, k) orthonormal PCA directions as columns, largest variance
            first; None when the Gaussians live in the full embedding space.
        means: (T, k) track means in the basis (zeros for a track without crops).
        covariances: (T, k, k) shrunk track covariances.
        shrinkage: (T,) weight of the pooled covariance in each track's, in (0, 1].
        counts: (T,) crops per track.
        pooled: (k, k) pooled within-track covariance, the shrinkage target.
    """

    centre: np.ndarray
    basis: np.ndarray | None
    means: np.ndarray
    covariances: np.ndarray
    shrinkage: np.ndarray
    counts: np.ndarray
    pooled: np.ndarray
    _whiten: np.ndarray = field(repr=False)
    _log_norm: np.ndarray = field(repr=False)

    @property
    def n_tracks(self) -> int:
        """Number of tracks T (including tracks without crops)."""
        return len(self.means)

    @property
    def dim(self) -> int:
        """Dimension k of the space the Gaussians live in."""
        return self.means.shape[1]

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) embeddings as (N, k) float64 points of the Gaussians' space."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.centre):
            raise ValueError(f"embeddings must have shape (N, {len(self.centre)}), got {x.shape}")
        x = x - self.centre
        return x if self.basis is None else x @ self.basis

    def log_pdf(self, points: np.ndarray, tracks: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Log-densities of points under the tracks' Gaussians.

        Args:
            points: (P, k) points already in the Gaussians' space (:meth:`project`).
            tracks: Track indices to score under; default all.

        Returns:
            (len(tracks), P) float64; -inf for a track without crops.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"points must have shape (P, {self.dim}), got {points.shape}")
        tracks = np.arange(self.n_tracks) if tracks is None else np.asarray(tracks, dtype=np.int64).reshape(-1)
        if len(tracks) and (tracks.min() < 0 or tracks.max() >= self.n_tracks):
            raise ValueError(f"track indices must lie in [0, {self.n_tracks}), got {tracks.min()}..{tracks.max()}")
        out = np.empty((len(tracks), len(points)))
        for rows, block in self._log_pdf_blocks(points, tracks):
            out[rows] = block
        return out

    def _log_pdf_blocks(self, points: np.ndarray, tracks: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """``(rows, log_pdf[rows])`` over blocks of ``tracks``, each block one matrix product."""
        k = self.dim
        step = max(1, _BLOCK_ELEMENTS // max(1, len(points) * k))
        for start in range(0, len(tracks), step):
            block = tracks[start : start + step]
            whiten = self._whiten[block]  # (B, k, k): L^-1 with covariance = L L^T
            # ||L^-1 (y - mu)||^2 for every point and track: one (P, k) @ (k, B k) product.
            z = (points @ whiten.reshape(-1, k).T).reshape(len(points), len(block), k)
            z -= np.einsum("bij,bj->bi", whiten, self.means[block])
            squared = np.einsum("pbk,pbk->bp", z, z)
            log_pdf = self._log_norm[block, None] - 0.5 * squared
            log_pdf[self.counts[block] == 0] = -np.inf
            yield slice(start, start + len(block)), log_pdf

    def _own_log_pdf(self, points: np.ndarray, crop_track: np.ndarray) -> np.ndarray:
        """(N,) log-density of each crop under its own track's Gaussian."""
        k = self.dim
        out = np.empty(len(points))
        step = max(1, _BLOCK_ELEMENTS // (k * k))
        for start in range(0, len(points), step):
            track = crop_track[start : start + step]
            diff = points[start : start + step] - self.means[track]
            z = np.matmul(self._whiten[track], diff[:, :, None])[:, :, 0]
            out[start : start + step] = self._log_norm[track] - 0.5 * np.einsum("nk,nk->n", z, z)
        return out


@dataclass(frozen=True)
class TrackMatches:
    """The matched track pairs of one matching pass.

    Attributes:
        pairs: (M, 2) int64 track indices, each pair once with ``a < b``, rows sorted.
        n_tracks: Number of tracks matched among.
        thresholds: (T,) each track's acceptance threshold theta_t, a log-density
            (NaN for a track without crops).
    """

    pairs: np.ndarray
    n_tracks: int
    thresholds: np.ndarray

    @property
    def count(self) -> int:
        """Number of matched pairs M."""
        return len(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def as_dict(self) -> dict[int, list[int]]:
        """Track index to its matched tracks (ascending), both ways; tracks without matches left out.

        The form :class:`~vcn.identity.selfsup.pairs.PairSampler` takes.
        """
        out: dict[int, list[int]] = {}
        for a, b in self.pairs.tolist():
            out.setdefault(a, []).append(b)
            out.setdefault(b, []).append(a)
        return {track: sorted(others) for track, others in sorted(out.items())}


def fit_track_gaussians(
    embeddings: np.ndarray,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    pca_dim: int | None = 32,
    prior_crops: float = 8.0,
) -> TrackGaussians:
    """Fit a shrunk Gaussian to each track's crop embeddings, in a PCA basis.

    Steps: (1) centre all crops and project them on their ``pca_dim`` leading
    principal directions; (2) per track, the mean and the (maximum-likelihood)
    scatter S_t of its crops; (3) the pooled within-track covariance P from all
    tracks of two or more crops, itself Ledoit-Wolf shrunk towards a scaled
    identity (``sklearn.covariance.ledoit_wolf_shrinkage``); (4) per track
    ``cov_t = (1 - a_t) S_t + a_t P`` with ``a_t`` the larger of

    * the Ledoit-Wolf intensity towards P, ``min(1, beta_t / ||S_t - P||_F^2)``
      with ``beta_t = (mean_i ||r_i||^4 - ||S_t||_F^2) / n_t`` (the closed form of
      Ledoit & Wolf 2004 with P as the target), and
    * the floor ``prior_crops / (prior_crops + n_t - 1)``: P counts as that many
      crops of evidence. Ledoit-Wolf's own estimate of the noise in S_t is itself
      noise for a handful of crops (with two crops it is exactly 0), so short
      tracks lean on the pooled shape; a one-crop track gets P outright.

    Tuning: ``pca_dim`` 32 keeps ~4-8x more crops than dimensions in a typical
    track and most of the identity variance of 128-512-d face embeddings; raise
    it for long tracks and many identities, lower it (16) for very short tracks.
    ``prior_crops`` 8 lets a track of ~30 crops weigh its own scatter ~80 %;
    raise it when tracks are short and noisy.

    Args:
        embeddings: (N, D) crop embeddings (L2-normalised or not), finite.
        crop_track: (N,) track index of each crop, in [0, n_tracks).
        n_tracks: Number of tracks T; tracks without crops get no Gaussian
            (their log-densities are -inf).
        pca_dim: Dimension of the PCA basis; None, or >= D, for the full space.
        prior_crops: Weight of the pooled covariance, in crops; > 0.

    Returns:
        The Gaussians.

    Raises:
        ValueError: On mismatched shapes, non-finite embeddings, track indices
            out of range or non-positive ``pca_dim``/``prior_crops``.
    """
    from scipy import sparse
    from sklearn.covariance import ledoit_wolf_shrinkage

    x, crop_track = _check_inputs(embeddings, crop_track, n_tracks)
    if pca_dim is not None and (isinstance(pca_dim, bool) or not isinstance(pca_dim, (int, np.integer)) or pca_dim < 1):
        raise ValueError(f"pca_dim must be a positive int or None, got {pca_dim!r}")
    if isinstance(prior_crops, bool) or not (math.isfinite(float(prior_crops)) and prior_crops > 0):
        raise ValueError(f"prior_crops must be a positive number, got {prior_crops!r}")
    n, d = x.shape

    # (1) PCA basis on all crops (eigenvectors of the D x D covariance; signs fixed for reproducibility).
    centre = x.mean(axis=0) if n else np.zeros(d)
    x = x - centre
    basis = None
    if pca_dim is not None and pca_dim < d:
        _, vectors = np.linalg.eigh(x.T @ x / max(n, 1))
        basis = vectors[:, ::-1][:, :pca_dim].copy()
        basis *= np.where(basis[np.abs(basis).argmax(axis=0), np.arange(pca_dim)] < 0, -1.0, 1.0)
        x = x @ basis
    k = x.shape[1]

    # (2) Per-track means and scatters, summed through a sparse crop-to-track indicator in crop chunks.
    counts = np.bincount(crop_track, minlength=n_tracks).astype(np.int64)
    member = sparse.csc_matrix((np.ones(n), (crop_track, np.arange(n))), shape=(n_tracks, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None] > 0, (member @ x) / counts[:, None], 0.0)
    residual = x - means[crop_track]
    scatter = np.zeros((n_tracks, k * k))
    step = max(1, _BLOCK_ELEMENTS // (k * k))
    for start in range(0, n, step):
        r = residual[start : start + step]
        scatter += member[:, start : start + step] @ (r[:, :, None] * r[:, None, :]).reshape(len(r), k * k)
    safe_counts = np.maximum(counts, 1)
    scatter = scatter.reshape(n_tracks, k, k) / safe_counts[:, None, None]
    fourth = np.bincount(crop_track, weights=(residual**2).sum(axis=1) ** 2, minlength=n_tracks) / safe_counts

    # (3) Pooled within-track covariance (unbiased), shrunk towards a scaled identity.
    several = counts[crop_track] >= 2
    within = residual[several]
    dof = len(within) - int((counts >= 2).sum())
    if dof > 0 and np.trace(within.T @ within) > 0:
        empirical = within.T @ within / dof
        intensity = ledoit_wolf_shrinkage(within, assume_centered=True)
    elif n >= 2 and (x**2).sum() > 0:
        # No track shows how a face varies: fall back on the spread of all crops.
        empirical = x.T @ x / (n - 1)
        intensity = ledoit_wolf_shrinkage(x, assume_centered=True)
    else:
        empirical, intensity = np.eye(k), 0.0
    scale = np.trace(empirical) / k
    pooled = (1 - intensity) * empirical + (intensity + _RIDGE) * scale * np.eye(k)

    # (4) Each track's scatter shrunk towards the pooled covariance.
    shrinkage = np.maximum(
        ledoit_wolf_intensity(scatter, fourth, counts, pooled),
        prior_crops / (prior_crops + np.maximum(counts - 1, 0)),
    )
    covariances = (1 - shrinkage)[:, None, None] * scatter + shrinkage[:, None, None] * pooled
    try:
        cholesky = np.linalg.cholesky(covariances)
    except np.linalg.LinAlgError as error:  # not expected: the pooled part is positive definite
        raise ValueError(f"a track covariance is not positive definite ({error}); embeddings degenerate?") from None
    whiten = np.linalg.inv(cholesky)
    log_norm = -0.5 * k * math.log(2 * math.pi) - np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(axis=1)
    return TrackGaussians(
        centre=centre,
        basis=basis,
        means=means,
        covariances=covariances,
        shrinkage=shrinkage,
        counts=counts,
        pooled=pooled,
        _whiten=whiten,
        _log_norm=log_norm,
    )


def ledoit_wolf_intensity(
    scatter: np.ndarray, fourth: np.ndarray, counts: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """Ledoit-Wolf shrinkage intensities of sample covariances towards a fixed target.

    ``min(1, beta / ||S - F||_F^2)`` with ``beta = (mean_i ||r_i||^4 - ||S||_F^2) / n``,
    the estimated squared error of the sample covariance S of n centred rows
    r_i (Ledoit & Wolf 2004). With the target ``F = tr(S)/k I`` this is
    ``sklearn.covariance.ledoit_wolf_shrinkage``.

    Args:
        scatter: (T, k, k) maximum-likelihood covariances S (sum r r^T / n).
        fourth: (T,) mean of ``||r_i||^4`` over each sample's rows.
        counts: (T,) rows per sample; samples of fewer than 2 rows get 1.
        target: (k, k) or (T, k, k) shrinkage target F.

    Returns:
        (T,) intensities in [0, 1].
    """
    squared_norm = np.einsum("tij,tij->t", scatter, scatter)
    beta = np.maximum(fourth - squared_norm, 0.0) / np.maximum(counts, 1)
    delta = np.einsum("tij,tij->t", scatter - target, scatter - target)
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = np.where(delta > 0, np.minimum(beta, delta) / delta, 1.0)
    return np.where(counts >= 2, intensity, 1.0)


def match_tracks(
    embeddings: np.ndarray,
    crop_track: np.ndarray,
    n_tracks: int,
    *,
    cannot_link: np.ndarray | Sequence[tuple[int, int]] | None = None,
    pca_dim: int | None = 32,
    quantile: float = 0.25,
    mutual: bool = False,
    prior_crops: float = 8.0,
) -> TrackMatches:
    """Coarse matches between tracks whose Gaussians cover each other's means.

    Per track t (Gaussians by :func:`fit_track_gaussians`): theta_t is the log of
    the mean density of its least typical crops, the lowest ``quantile`` of its
    crops by density under its own Gaussian (at least one crop; computed as a
    log-mean-exp, exactly the paper's "mean pdf" without underflow). Track u
    matches t when ``logpdf_t(mean_u) >= theta_t``. That relation is directed;
    the pairs returned are the symmetric closure: a pair where either track
    accepts the other (``mutual=False``, default, the more matches), or only
    where both do (``mutual=True``, the more precise).

    A track of one crop has theta at its Gaussian's peak, so it accepts (almost)
    nothing; with ``mutual=False`` other tracks can still accept it.

    Tuning: ``quantile`` 0.25 is the paper's. A larger one raises theta (fewer,
    surer matches); a smaller one lowers it. Prefer ``mutual=True`` when the
    matches' precision (:func:`match_precision`) is poor.

    Args:
        embeddings: (N, D) crop embeddings.
        crop_track: (N,) track index of each crop, in [0, n_tracks).
        n_tracks: Number of tracks T; tracks without crops match nothing.
        cannot_link: (P, 2) track pairs that must not match (for example tracks
            that share a frame); either order.
        pca_dim: Dimension of the PCA basis (see :func:`fit_track_gaussians`).
        quantile: Fraction of each track's crops, the least typical, that sets
            its threshold; in (0, 1].
        mutual: Keep only pairs accepted both ways.
        prior_crops: Weight of the pooled covariance (see :func:`fit_track_gaussians`).

    Returns:
        The matches.

    Raises:
        ValueError: On bad shapes or values (see :func:`fit_track_gaussians`), a
            ``quantile`` outside (0, 1], or cannot-link pairs out of range.
    """
    if isinstance(quantile, bool) or not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    gaussians = fit_track_gaussians(embeddings, crop_track, n_tracks, pca_dim=pca_dim, prior_crops=prior_crops)
    crop_track = np.asarray(crop_track, dtype=np.int64)
    forbidden = _pair_keys(_check_pairs(cannot_link, n_tracks, "cannot_link"), n_tracks)
    points = gaussians.project(embeddings)
    counts = gaussians.counts

    # theta_t: log of the mean density of the track's least typical crops.
    own = gaussians._own_log_pdf(points, crop_track)
    order = np.lexsort((own, crop_track))  # by track, then density ascending
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[crop_track[order]]
    lowest = order[rank < np.maximum(1, np.ceil(quantile * counts[crop_track[order]]))]
    tracks, values = crop_track[lowest], own[lowest]
    peak = np.full(n_tracks, -np.inf)
    np.maximum.at(peak, tracks, values)
    total = np.bincount(tracks, weights=np.exp(values - peak[tracks]), minlength=n_tracks)
    taken = np.bincount(tracks, minlength=n_tracks)
    with np.errstate(divide="ignore", invalid="ignore"):
        thresholds = np.where(counts > 0, peak + np.log(total / taken), np.nan)

    # Every track mean under every Gaussian, a block of tracks at a time; keep the accepted (t, u).
    valid = np.flatnonzero(counts > 0)
    accepted = []
    for rows, log_pdf in gaussians._log_pdf_blocks(gaussians.means[valid], valid):
        t, u = np.nonzero(log_pdf >= thresholds[valid[rows], None])
        t, u = valid[rows][t], valid[u]
        accepted.append(_pair_keys(np.stack([t, u], axis=1)[t != u], n_tracks))
    keys, times = np.unique(np.concatenate(accepted or [np.zeros(0, np.int64)]), return_counts=True)
    if mutual:
        keys = keys[times == 2]
    keys = keys[~np.isin(keys, forbidden)]
    pairs = np.stack([keys // max(n_tracks, 1), keys % max(n_tracks, 1)], axis=1).astype(np.int64)
    return TrackMatches(pairs=pairs, n_tracks=n_tracks, thresholds=thresholds)


def match_precision(pairs: np.ndarray, labels: Sequence | np.ndarray) -> float:
    """Fraction of matched track pairs whose tracks carry the same label.

    A diagnostic to log where labels exist; matching never sees labels.

    Args:
        pairs: (M, 2) track indices, e.g. :attr:`TrackMatches.pairs`.
        labels: Label of each track (any comparable values), indexed by track.

    Returns:
        The precision in [0, 1]; NaN when there are no pairs (nothing to be precise about).
    """
    pairs = _check_pairs(pairs, len(labels), "pairs")
    if len(pairs) == 0:
        return float("nan")
    labels = np.asarray(labels)
    return float((labels[pairs[:, 0]] == labels[pairs[:, 1]]).mean())


# --- input checks ------------------------------------------------------------------------------


def _check_inputs(embeddings: np.ndarray, crop_track: np.ndarray, n_tracks: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_tracks, bool) or not isinstance(n_tracks, (int, np.integer)) or n_tracks < 0:
        raise ValueError(f"n_tracks must be a non-negative int, got {n_tracks!r}")
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (N, D), got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"embeddings must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"embeddings hold {int((~np.isfinite(x)).any(axis=1).sum())} non-finite rows")
    track = np.asarray(crop_track)
    if track.shape != (len(x),):
        raise ValueError(f"crop_track must have shape ({len(x)},) like embeddings' rows, got {track.shape}")
    if len(track) and not np.issubdtype(track.dtype, np.integer):
        raise ValueError(f"crop_track must hold integer track indices, got dtype {track.dtype}")
    track = track.astype(np.int64)
    if len(track) and (track.min() < 0 or track.max() >= n_tracks):
        raise ValueError(f"crop_track values must lie in [0, {n_tracks}), got {track.min()}..{track.max()}")
    return x, track


def _check_pairs(pairs: np.ndarray | Sequence | None, n_tracks: int, name: str) -> np.ndarray:
    if pairs is None:
        return np.zeros((0, 2), dtype=np.int64)
    array = np.asarray(pairs)
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an (M, 2) array of integer track indices, got {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() >= n_tracks:
        raise ValueError(f"{name} must hold track indices in [0, {n_tracks}), got {array.min()}..{array.max()}")
    return array.astype(np.int64)


def _pair_keys(pairs: np.ndarray, n_tracks: int) -> np.ndarray:
    """One int64 per unordered pair: ``min * T + max``."""
    low, high = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    return low * n_tracks + high
