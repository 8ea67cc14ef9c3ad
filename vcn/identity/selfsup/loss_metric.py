"""The finetuned model's own loss as the clustering's dissimilarity (DESIGN.md section 3).

Two readings live here. :class:`LossDissimilarity` is the loss as the method states it (below);
the paper's adaptive thresholds compare sets by it. :class:`LossDivergence` is what
``--similarity loss`` clusters by: the same loss between two sets less each set's own, with the
targets at the student's temperature, so that it is a divergence between the two sets' predictions
(``benchmarks/results/loss_readings.md`` measures why: as written, each track's own loss enters every
comparison and the tracks on screen together are no longer a sample of how far apart people are).

Between two crops a and b, with head logits ``z`` from the finetuned student,

    d(a, b) = (L(a -> b) + L(b -> a)) / 2,   L(a -> b) = -p_a . log q_b,

where ``p = softmax((z - c) / tau_t)`` is the centred, sharpened target the crop
would get as the teacher's view and ``q = softmax(z / tau_s)`` the student's
prediction (:func:`vcn.identity.selfsup.loss.symmetric_loss`). It is bilinear in the
per-crop factors ``u = p`` and ``v = -log q``, so it plugs into the clustering's
:class:`~vcn.clustering.dissimilarity.Factors` with offset 0, and the mean over all crop pairs
of two clusters is the same form on the clusters' mean factors.

The finetuned student stands in for the teacher in both roles: at the end of a
round the teacher is the student's slow average and differs little, and one
forward pass per crop gives both factors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vcn.clustering.dissimilarity import Factors
from vcn.identity.selfsup.sampling import spread_crops

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Crops the loss metric is computed on at most (more when a movie has more
#: tracks: every track keeps one). Each costs K logits in float32 and two K-vectors
#: of factors in float64, which the clustering copies once: 36 bytes x K, 576 KiB
#: at K = 16384, 2.3 GiB at this cap; a movie with more crops is compared on an
#: even subset of each track's (:func:`loss_metric_rows`). A 5-minute movie
#: (~2,800 crops) is under it. (The clustering's own per-track factors, a few
#: (tracks, K) float64 arrays, still grow with the number of tracks.)
MAX_CROPS = 4096
#: Rows of logits turned into factors at a time, bounding the float64 temporaries.
_FACTOR_ROWS = 512


class LossDissimilarity:
    """The symmetrised self-distillation loss between crops, from their head logits.

    Args:
        center: (K,) centre of the teacher logits at the end of training
            (:attr:`vcn.identity.selfsup.trainer.TrainResult.center`).
        student_temperature: tau_s the model was trained with.
        teacher_temperature: Final tau_t the model was trained with.

    Raises:
        ValueError: On a centre that is not a finite vector or a non-positive temperature.
    """

    name = "loss-as-written"
    #: Off for the loss metric: its head places one person's photo groups about as far apart as two people
    #: (same-person recall at the cut's quantiles half the cosine's on dev-ep), and holding merges of large
    #: clusters to the lower decile split people further: BCubed F -3.2 on dev-mv, -2.4 on dev-ep, -5.7 on
    #: BBT S01E02 (+4.9 on a Buffy episode of dev-mv's kind) for the divergence reading
    #: (benchmarks/results/loss_readings_group_cut_on_loss.md against loss_readings.md).
    group_cut = False

    def __init__(
        self, center: np.ndarray | torch.Tensor, student_temperature: float, teacher_temperature: float
    ) -> None:
        if hasattr(center, "detach"):
            center = center.detach().cpu().numpy()
        center = np.asarray(center, dtype=np.float64)
        if center.ndim != 1 or len(center) == 0 or not np.isfinite(center).all():
            raise ValueError(f"center must be a finite (K,) vector, got shape {center.shape}")
        temperatures = {"student_temperature": student_temperature, "teacher_temperature": teacher_temperature}
        for label, value in temperatures.items():
            if not (np.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{label} must be a positive finite number, got {value!r}")
        self.center = center
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)

    def factors(self, outputs: np.ndarray) -> Factors:
        """Factors ``u = p`` (teacher targets) and ``v = -log q`` (student) of (N, K) logits.

        Computed in float64, so that the bilinear form reproduces
        :func:`vcn.identity.selfsup.loss.symmetric_loss` to round-off.

        Raises:
            ValueError: If ``outputs`` is not an (N, K) array with K the centre's length.
            FloatingPointError: On non-finite logits.
        """
        import torch

        from vcn.identity.selfsup.loss import student_log_probs, teacher_targets

        logits = np.asarray(outputs)
        if logits.ndim != 2 or logits.shape[1] != len(self.center):
            raise ValueError(f"logits must be an (N, {len(self.center)}) array, got shape {logits.shape}")
        center = torch.from_numpy(self.center)
        u = np.empty(logits.shape, dtype=np.float64)
        v = np.empty(logits.shape, dtype=np.float64)
        # Row by row the same numbers as all at once; in chunks, the temporaries stay small.
        for start in range(0, len(logits), _FACTOR_ROWS):
            rows = slice(start, start + _FACTOR_ROWS)
            z = torch.from_numpy(np.asarray(logits[rows], dtype=np.float64))
            if not bool(torch.isfinite(z).all()):
                raise FloatingPointError("logits hold non-finite values (NaN or inf)")
            u[rows] = teacher_targets(z, center, self.teacher_temperature).numpy()
            np.negative(student_log_probs(z, self.student_temperature).numpy(), out=v[rows])
        return Factors(u=u, v=v, offset=0.0)

    def representative(self, mean_u: np.ndarray, mean_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The set's mean factors, unchanged: sets compare by the mean loss over all crop pairs.

        Cosine needs a centroid (:class:`~vcn.clustering.dissimilarity.CosineDissimilarity`)
        because the pair mean keeps each set's own spread, which keeps a single
        track's threshold below any distance to another track. The finetuned loss
        saturates instead: training pulls every crop of one person onto the same
        sharp target, so the loss between two crops of one person is about as low
        as within a track, and the pair mean is the paper's S(A, B) as written.
        """
        return mean_u, mean_v

    def paper_form(self) -> LossDissimilarity:
        """The form the paper's adaptive thresholds compare sets by: this one."""
        return self


class LossDivergence(LossDissimilarity):
    """The finetuned loss between two sets of crops less each set's own: what ``--similarity loss`` clusters by.

    Between sets A and B (a track, a cluster of tracks),

        D(A, B) = S(A, B) - (S(A, A) + S(B, B)) / 2,

    with ``S`` the mean symmetrised loss over all crop pairs (:class:`LossDissimilarity`) and the
    targets ``p = softmax((z - c) / tau_s)`` sharpened at the student's temperature instead of the
    teacher's. Two reasons, both measured on the development episodes
    (``benchmarks/results/loss_readings.md``):

    - ``S(A, B)`` holds the cross-entropy of each set's own predictions, which differs from track to
      track (a sharp, confident track has a low one). Tracks on screen together then sit farther
      apart than people in general, and a cut drawn from them merges people (on dev-mv the 5 %
      quantile of those pairs passed 10.3 % of all different-person pairs). Subtracting each set's
      own loss removes that term.
    - With the targets at the student's temperature it is a divergence: between two crops with a
      zero centre, ``D = (p_a - p_b) . (log p_a - log p_b) / 2``, half the symmetrised
      Kullback-Leibler divergence of their predictions (zero for equal ones, positive otherwise).
      At the teacher's sharper temperature it is not, and the clusters were 6.7 BCubed F points
      worse on dev-mv.

    Every crop keeps the bilinear factors of the loss; a set's representative is its mean factors
    with one more column each, ``(mean_u . mean_v, -1)``, so that the form between two
    representatives is the cross term less the mean of their own terms, and average linkage over
    tracks stays a mean of bilinear forms. The temperatures passed are the ones the model trained
    with; :meth:`paper_form` gives the loss as written at those temperatures.
    """

    name = "loss"

    def factors(self, outputs: np.ndarray) -> Factors:
        """Factors ``u = softmax((z - c) / tau_s)`` and ``v = -log softmax(z / tau_s)`` of (N, K) logits."""
        return LossDissimilarity(self.center, self.student_temperature, self.student_temperature).factors(outputs)

    def representative(self, mean_u: np.ndarray, mean_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The set's mean factors and its own mean loss as one more column (see the class docstring)."""
        own = np.einsum("ij,ij->i", mean_u, mean_v)[:, None]
        return np.hstack([mean_u, own]), np.hstack([mean_v, -np.ones_like(own)])

    def paper_form(self) -> LossDissimilarity:
        """The loss as the method states it, at the temperatures the model trained with."""
        return LossDissimilarity(self.center, self.student_temperature, self.teacher_temperature)


def loss_metric_rows(crop_track: np.ndarray, max_crops: int | None = None) -> np.ndarray:
    """The crops a movie's loss metric is computed on: sorted indices into ``crop_track``.

    All crops when there are at most ``max_crops``: the clustering is then the
    same as on all of them. Beyond, an even subset of each track's crops
    (:func:`~vcn.identity.selfsup.sampling.spread_crops`), at least one per track so that
    no track drops out of the clustering.

    Args:
        crop_track: (N,) track index of each crop, in ``0..T-1``.
        max_crops: Most crops to keep (exceeded only by a movie with more tracks);
            default :data:`MAX_CROPS`, read when called.
    """
    crop_track = np.asarray(crop_track, dtype=np.int64)
    n_tracks = len(np.unique(crop_track))
    return spread_crops(crop_track, max(MAX_CROPS if max_crops is None else max_crops, n_tracks, 1))


def sample_quality(crop_quality: np.ndarray | None, crop_track: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """The crop quality to cluster the crops at ``rows`` (of :func:`loss_metric_rows`) with.

    Each kept crop carries its track's mean quality over all its crops, so that
    the quality screen judges every track as it would on all of them; all crops
    kept, their own quality. None when ``crop_quality`` is None.
    """
    if crop_quality is None or len(rows) == len(crop_track):
        return crop_quality
    from vcn.identity.quality import track_quality

    crop_track = np.asarray(crop_track, dtype=np.int64)
    means = track_quality(crop_quality, crop_track, int(crop_track.max()) + 1)
    return means[crop_track[rows]]


@dataclass(frozen=True, eq=False)
class LossSample:
    """What clustering by the loss metric takes: head logits of a bounded sample of crops, and the metric.

    Attributes:
        rows: (M,) sorted positions of the sampled crops among all (:func:`loss_metric_rows`).
        logits: (M, K) float32 head logits of those crops through the finetuned student.
        metric: The finetuned model's loss between sets of crops (:class:`LossDivergence`).
        model_version: Version of the finetuned model that gave the logits.
        device: Where that model ran.
    """

    rows: np.ndarray
    logits: np.ndarray
    metric: LossDissimilarity
    model_version: str
    device: str

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write it as one ``.npz`` file at ``path`` (no suffix added)."""
        with open(path, "wb") as file:
            np.savez(
                file, rows=self.rows, logits=self.logits, center=self.metric.center,
                temperatures=np.array([self.metric.student_temperature, self.metric.teacher_temperature]),
                model_version=np.array(self.model_version), device=np.array(self.device),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LossSample:
        """Read a file written by :meth:`save`."""
        with np.load(path) as data:
            student, teacher = data["temperatures"].tolist()
            return cls(
                rows=data["rows"], logits=data["logits"], metric=LossDivergence(data["center"], student, teacher),
                model_version=str(data["model_version"]), device=str(data["device"]),
            )


def crop_logits(
    backbone_module: nn.Module,
    head: nn.Module,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    chips: np.ndarray,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Head logits of the finetuned student for aligned face chips.

    Runs in eval mode (batch norm on running statistics) without gradients; the
    modules' training flags are restored afterwards.

    Args:
        backbone_module: The finetuned backbone (:attr:`TrainResult.backbone`).
        head: Its projection head (:attr:`TrainResult.head`).
        preprocess: The backbone's input normalisation
            (:meth:`vcn.identity.backbone.Backbone.preprocess`), on 0..255 float RGB (N, 3, S, S).
        chips: (N, S, S, 3) uint8 RGB chips aligned for the backbone.
        device: Where to run; the modules are moved there.
        batch_size: Chips per forward pass.

    Returns:
        (N, K) float32 logits.

    Raises:
        ValueError: On chips that are not a 4-d uint8 RGB array, or ``batch_size`` < 1.
        FloatingPointError: If the model gives non-finite logits.
    """
    import torch

    if not (isinstance(chips, np.ndarray) and chips.dtype == np.uint8 and chips.ndim == 4 and chips.shape[3] == 3):
        raise ValueError(f"chips must be a (N, S, S, 3) uint8 array, got {getattr(chips, 'dtype', None)} "
                         f"{getattr(chips, 'shape', None)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    modes = (backbone_module.training, head.training)
    backbone_module.to(device).eval()
    head.to(device).eval()
    outputs = []
    try:
        with torch.inference_mode():
            for start in range(0, len(chips), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(chips[start : start + batch_size])).to(device)
                x = preprocess(batch.permute(0, 3, 1, 2).float())
                outputs.append(head(backbone_module(x)).float().cpu())
    finally:
        backbone_module.train(modes[0])
        head.train(modes[1])
    out_dim = getattr(head, "out_dim", 0)
    logits = torch.cat(outputs).numpy() if outputs else np.zeros((0, out_dim), dtype=np.float32)
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        raise FloatingPointError(f"the model gave non-finite logits for {bad} of {len(logits)} chips")
    return logits
