"""Track-level clustering metrics: WCP, PCR, NMI, BCubed and pairwise P/R/F.

The unit of evaluation is the face track. Ground truth maps every labelled
track to an identity; a prediction maps tracks to cluster names, or to
Unknown (``None``, an empty ``cluster`` cell in the CSV) when the clusterer
declined to assign the track.

Unknown convention:
    Every Unknown track counts as its own singleton cluster in WCP, NMI,
    BCubed and the pairwise figures, so leaving a track Unknown costs recall
    and can never raise a score that merging it would lower. Unknown tracks
    are *not* counted in ``n_clusters`` and hence not in PCR: PCR measures how
    many clusters the clusterer actually formed. ``wcp_clustered`` and
    ``bcubed_f_clustered`` repeat WCP and BCubed F over the clustered
    (non-Unknown) tracks only, to separate "how clean are the clusters" from
    "how much was left out".

Always read WCP together with PCR: all-singletons scores WCP 100 % at
PCR = N / k (DESIGN.md, section 4).

Definitions (N labelled tracks, n_cy tracks of cluster c with identity y,
a_c = cluster sizes, b_y = identity sizes):

- WCP = Σ_c max_y n_cy / N.
- PCR = number of predicted clusters / number of identities.
- NMI = I(C; Y) / ((H(C) + H(Y)) / 2), the arithmetic-mean normalisation of
  ``sklearn.metrics.normalized_mutual_info_score``. As there, it is 1.0 when
  both sides form a single group and 0.0 when the mutual information is 0.
- BCubed precision = (1/N) Σ_cy n_cy² / a_c, recall = (1/N) Σ_cy n_cy² / b_y
  (the per-track averages of Bagga & Baldwin, 1998).
- Pairwise figures over unordered pairs of tracks; a pair is predicted
  positive iff both tracks are in the same (non-Unknown) cluster, and truly
  positive iff they share the identity. With no predicted-positive pair the
  precision is 1.0 (no false merge was made); with no true pair the recall
  is 1.0 (there was nothing to find).
- Every F is the harmonic mean of its precision and recall, 0.0 when both are 0.

All scores are fractions in [0, 1]; :func:`format_table` shows percentages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from vcn.errors import VcnError
from vcn.formats.trackset import TracksetError, read_labels, read_predictions

StrPath = str | os.PathLike[str]

#: How many missing track ids an error message lists before summarising.
_MAX_LISTED = 5


class MetricsInputError(VcnError, ValueError):
    """A label or prediction file, or a mapping passed to :func:`evaluate`, is unusable.

    Attributes:
        path: The offending file, or ``None`` for in-memory input.
        line: The 1-based line of the file, or ``None`` when no line applies.
    """

    def __init__(self, reason: str, path: StrPath | None = None, line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = reason
        where = self.path or ""
        if line is not None:
            where = f"{where} line {line}"
        super().__init__(f"{where}: {reason}" if where else reason)


@dataclass(frozen=True)
class ClusteringScores:
    """Track-level clustering scores of one prediction against ground truth.

    Attributes:
        n_tracks: Labelled tracks evaluated (N).
        n_identities: Distinct true identities among them (k).
        n_clusters: Distinct predicted clusters among them, Unknown excluded.
        n_unknown: Labelled tracks predicted Unknown.
        n_unlabelled_predictions: Predicted tracks without a label (ignored).
        unknown_fraction: ``n_unknown / n_tracks``.
        wcp: Weighted cluster purity, Unknown tracks as singletons.
        pcr: Predicted cluster ratio ``n_clusters / n_identities``.
        nmi: Normalised mutual information, Unknown tracks as singletons.
        bcubed_precision: BCubed precision, Unknown tracks as singletons.
        bcubed_recall: BCubed recall, Unknown tracks as singletons.
        bcubed_f: Harmonic mean of the two above.
        pairwise_precision: Fraction of predicted same-cluster pairs sharing
            the identity (1.0 when no pair is predicted).
        pairwise_recall: Fraction of same-identity pairs predicted in one
            cluster (1.0 when no identity has two tracks).
        pairwise_f: Harmonic mean of the two above.
        wcp_clustered: WCP over the non-Unknown tracks only; ``None`` when
            every track is Unknown.
        bcubed_f_clustered: BCubed F over the non-Unknown tracks only (their
            identities' sizes also counted among them); ``None`` when every
            track is Unknown.
    """

    n_tracks: int
    n_identities: int
    n_clusters: int
    n_unknown: int
    n_unlabelled_predictions: int
    unknown_fraction: float
    wcp: float
    pcr: float
    nmi: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f: float
    wcp_clustered: float | None
    bcubed_f_clustered: float | None

    def to_dict(self) -> dict[str, int | float | None]:
        """The scores as a flat dict of plain Python numbers (JSON- and metadata-ready)."""
        return asdict(self)


# --------------------------------------------------------------------------- scoring


def evaluate(labels: Mapping[str, str], predicted: Mapping[str, str | None]) -> ClusteringScores:
    """Score a track clustering against ground truth, over the labelled tracks.

    Args:
        labels: Track id -> true identity (non-empty).
        predicted: Track id -> cluster name, or ``None`` for Unknown. Must
            cover every labelled track; tracks absent from ``labels`` are
            ignored and only counted.

    Returns:
        The scores; see the module docstring for definitions and conventions.

    Raises:
        MetricsInputError: No labelled track, an empty identity or cluster
            name, or labelled tracks without a prediction.
    """
    if not labels:
        raise MetricsInputError("no labelled tracks to evaluate")
    missing = [track for track in labels if track not in predicted]
    if missing:
        raise MetricsInputError(
            f"no prediction for {len(missing)} of {len(labels)} labelled tracks: {_listing(missing)}"
        )
    tracks = list(labels)
    true_names = [labels[t] for t in tracks]
    pred_names = [predicted[t] for t in tracks]
    for track, identity, cluster in zip(tracks, true_names, pred_names):
        if not identity:
            raise MetricsInputError(f"empty identity for track {track!r}")
        if cluster == "":
            raise MetricsInputError(f"empty cluster name for track {track!r}; use None for Unknown")

    # Encode identities and clusters as integers; Unknown tracks get one fresh cluster each.
    y = _codes(true_names)
    known = np.array([name is not None for name in pred_names], dtype=bool)
    c = np.empty(len(tracks), dtype=np.int64)
    c[known] = _codes([name for name in pred_names if name is not None])
    n_clusters = int(c[known].max()) + 1 if known.any() else 0
    n_unknown = int((~known).sum())
    c[~known] = n_clusters + np.arange(n_unknown)

    table = _Contingency(c, y)
    bc_p, bc_r = table.bcubed()
    pw_p, pw_r = table.pairwise()
    if known.any():
        clustered = _Contingency(c[known], _codes(y[known]))
        wcp_clustered, bcubed_f_clustered = clustered.wcp(), _f(*clustered.bcubed())
    else:
        wcp_clustered = bcubed_f_clustered = None
    n = len(tracks)
    return ClusteringScores(
        n_tracks=n,
        n_identities=table.n_cols,
        n_clusters=n_clusters,
        n_unknown=n_unknown,
        n_unlabelled_predictions=sum(1 for track in predicted if track not in labels),
        unknown_fraction=n_unknown / n,
        wcp=table.wcp(),
        pcr=n_clusters / table.n_cols,
        nmi=table.nmi(),
        bcubed_precision=bc_p,
        bcubed_recall=bc_r,
        bcubed_f=_f(bc_p, bc_r),
        pairwise_precision=pw_p,
        pairwise_recall=pw_r,
        pairwise_f=_f(pw_p, pw_r),
        wcp_clustered=wcp_clustered,
        bcubed_f_clustered=bcubed_f_clustered,
    )


def evaluate_files(labels_path: StrPath, pred_path: StrPath) -> ClusteringScores:
    """Read a label CSV and a prediction CSV and :func:`evaluate` them.

    The files are in the track dataset format: ``track_id,identity`` read by
    :func:`vcn.formats.trackset.read_labels`, ``track_id,cluster`` (an empty
    cluster for Unknown) by :func:`vcn.formats.trackset.read_predictions`.

    Raises:
        MetricsInputError: Any reading error (naming the file and line), or
            labelled tracks without a prediction row (named with their line in
            the label file).
    """
    try:
        labels = read_labels(labels_path)
        predicted = read_predictions(pred_path)
    except TracksetError as error:
        raise MetricsInputError(error.reason, error.path, error.line) from None
    if not labels.identities:
        raise MetricsInputError("no labelled tracks to evaluate", labels_path)
    missing = [track for track in labels.identities if track not in predicted]
    if missing:
        listed = [f"{track!r} ({labels_path} line {labels.lines[track]})" for track in missing[:_MAX_LISTED]]
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise MetricsInputError(
            f"no prediction row for {len(missing)} of {len(labels.identities)} labelled tracks: {', '.join(listed)}{more}",
            pred_path,
        )
    return evaluate(labels.identities, predicted)


class _Contingency:
    """The sparse contingency table of integer cluster codes ``c`` against identity codes ``y``.

    Codes must be dense (0..n-1, each used), as :func:`_codes` produces.
    """

    def __init__(self, c: np.ndarray, y: np.ndarray) -> None:
        self.n = len(c)
        self.n_cols = int(y.max()) + 1
        cells, counts = np.unique(c * self.n_cols + y, return_counts=True)
        # Non-zero cells, sorted by cluster then identity.
        self.rows, self.cols = np.divmod(cells, self.n_cols)
        self.counts = counts.astype(np.int64)
        self.row_sums = np.bincount(c).astype(np.int64)
        self.col_sums = np.bincount(y).astype(np.int64)

    def wcp(self) -> float:
        # Cells are grouped by cluster: the purity of each group is its largest cell.
        starts = np.flatnonzero(np.r_[True, self.rows[1:] != self.rows[:-1]])
        return float(np.maximum.reduceat(self.counts, starts).sum() / self.n)

    def bcubed(self) -> tuple[float, float]:
        sq = self.counts.astype(np.float64) ** 2
        precision = (sq / self.row_sums[self.rows]).sum() / self.n
        recall = (sq / self.col_sums[self.cols]).sum() / self.n
        return float(precision), float(recall)

    def pairwise(self) -> tuple[float, float]:
        true_positive = _pairs(self.counts)
        predicted = _pairs(self.row_sums)
        actual = _pairs(self.col_sums)
        precision = true_positive / predicted if predicted else 1.0
        recall = true_positive / actual if actual else 1.0
        return float(precision), float(recall)

    def nmi(self) -> float:
        if len(self.row_sums) == 1 and self.n_cols == 1:
            return 1.0  # Neither side splits the data: a perfect match.
        n = float(self.n)
        p = self.counts / n
        log_n = np.log(n)
        log_ratio = (
            np.log(self.counts) + log_n - np.log(self.row_sums[self.rows]) - np.log(self.col_sums[self.cols])
        )
        mi = float(np.sum(p * log_ratio))
        if mi <= 0.0:
            return 0.0
        normaliser = (_entropy(self.row_sums, n) + _entropy(self.col_sums, n)) / 2
        return float(min(mi / max(normaliser, np.finfo(np.float64).eps), 1.0))


def _codes(values: list[str] | np.ndarray) -> np.ndarray:
    """Dense integer codes (0..k-1) of the distinct values."""
    return np.unique(np.asarray(values), return_inverse=True)[1].astype(np.int64).ravel()


def _pairs(sizes: np.ndarray) -> int:
    """Number of unordered pairs within groups of the given sizes."""
    return int((sizes * (sizes - 1) // 2).sum())


def _entropy(sizes: np.ndarray, n: float) -> float:
    p = sizes / n
    return float(-np.sum(p * np.log(p)))


def _f(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _listing(tracks: list[str]) -> str:
    listed = ", ".join(repr(t) for t in tracks[:_MAX_LISTED])
    return f"{listed} and {len(tracks) - _MAX_LISTED} more" if len(tracks) > _MAX_LISTED else listed


# --------------------------------------------------------------------------- reporting


def format_table(scores: ClusteringScores) -> str:
    """A two-column aligned text table of the scores, percentages where they are fractions."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f} %"

    rows = [
        ("tracks", str(scores.n_tracks)),
        ("identities", str(scores.n_identities)),
        ("predicted clusters", str(scores.n_clusters)),
        ("unknown tracks", str(scores.n_unknown)),
        ("unknown fraction", pct(scores.unknown_fraction)),
        ("unlabelled predictions (ignored)", str(scores.n_unlabelled_predictions)),
        ("WCP", pct(scores.wcp)),
        ("PCR", f"{scores.pcr:.3f}"),
        ("NMI", pct(scores.nmi)),
        ("BCubed precision", pct(scores.bcubed_precision)),
        ("BCubed recall", pct(scores.bcubed_recall)),
        ("BCubed F", pct(scores.bcubed_f)),
        ("pairwise precision", pct(scores.pairwise_precision)),
        ("pairwise recall", pct(scores.pairwise_recall)),
        ("pairwise F", pct(scores.pairwise_f)),
        ("WCP, clustered tracks only", pct(scores.wcp_clustered)),
        ("BCubed F, clustered tracks only", pct(scores.bcubed_f_clustered)),
    ]
    left = max(len(name) for name, _ in rows)
    right = max(len(value) for _, value in rows)
    return "\n".join(f"{name:<{left}}  {value:>{right}}" for name, value in rows)
