"""Clustering the face tracks of a track dataset: the product behind ``vcn cluster-tracks``.

A track dataset (``shared/formats/trackset-v1.md``) holds tracks detected and
tracked elsewhere, each a list of loose face crops. :func:`align_trackset`
brings them to where a movie of our own is after detection, tracking and
cropping:

1. read ``tracks.csv`` and ``crops.csv`` (never ``labels.csv``: the ground truth
   plays no part in clustering);
2. find and align the face in every crop for the backbone's template.

From there :func:`cluster_trackset` runs the movie's own pipeline
(:mod:`vcn.pipeline`): adapt the backbone, embed (with quality), cluster, with
cannot-link between tracks on screen together.

A track with any problem (no crops, a missing or unreadable crop file, a crop
outside its frames) takes no part: it is reported and left Unknown, as the
format asks, so one bad track never costs the whole episode and never enters a
cluster on partial evidence.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from vcn.formats.trackset import TrackProblem

if TYPE_CHECKING:
    from vcn.identity.backbone import Backbone
    from vcn.identity.selfsup.finetune import FinetunedModel
    from vcn.pipeline import ChipArray

logger = logging.getLogger(__name__)

#: Called as ``progress(step, done, total)`` while a step runs; ``step`` is ``"align"`` or ``"embed"``.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True, eq=False)
class TracksetClustering:
    """What :func:`cluster_trackset` found, one entry per track in ``tracks.csv`` order.

    Attributes:
        track_ids: Every track of ``tracks.csv``, in file order.
        clusters: Cluster of each track as a string, ``"0"`` the largest cluster,
            ``"1"`` the next and so on; ``None`` for a track left Unknown (a
            problem track, or a low-quality one). Ready for
            :func:`vcn.formats.trackset.write_predictions`.
        problems: Per-track problems found while reading and aligning; each
            named track is Unknown.
        crops_by_method: How many of the crops used were aligned by each
            method of :data:`vcn.faces.loose_crops.METHODS` (all listed).
        n_crops: Crops used (embedded): those of the tracks without problems.
        track_quality: (T,) float64 mean crop quality per track; NaN where none
            was computed (quality off or unsupported, or the track has no crops).
        embeddings: (T, D) float32 track embeddings: the mean of the track's
            crop embeddings, scaled to unit length. Tracks without crops (the
            problem tracks) get a row of NaN, so that they cannot pass for a
            point of the embedding space; :attr:`has_crops` tells them apart.
        thumbnails: Track id -> the track's middle aligned chip (by frame),
            (S, S, 3) uint8 RGB. Tracks without crops are absent.
        n_clusters: Clusters formed.
        n_unknown: Tracks left Unknown, problem and low-quality tracks together.
        n_low_quality: Low-quality tracks left Unknown (those within the cut of a cluster joined it).
        quality_cut: The movie's quality cut (-inf when quality was not used).
        model_version: Version of the weights that embedded the crops (the
            finetuned model's when finetuned and kept by its check).
        dissimilarity: Name of the dissimilarity the clustering used.
        timings: Seconds per step in the order run: ``read``, ``load_backbone``
            (when the default backbone was loaded here), ``align``, ``finetune``
            (when finetuned), ``embed`` (with quality scoring), ``cluster``.
        finetuned: The model adapted to the dataset (its history, collapse
            diagnostics and check included; :attr:`~vcn.identity.selfsup.finetune.FinetunedModel.steps_aside`
            says when the pretrained model embedded the crops instead); None without finetuning.
        not_finetuned: Why there was no finetuning (turned off, a backbone not finetuned on a CPU, ...).
    """

    track_ids: list[str]
    clusters: list[str | None]
    problems: list[TrackProblem]
    crops_by_method: dict[str, int]
    n_crops: int
    track_quality: np.ndarray
    embeddings: np.ndarray
    thumbnails: dict[str, np.ndarray]
    n_clusters: int
    n_unknown: int
    n_low_quality: int
    quality_cut: float
    model_version: str
    dissimilarity: str
    timings: dict[str, float] = field(default_factory=dict)
    finetuned: FinetunedModel | None = None
    not_finetuned: str | None = None

    @property
    def has_crops(self) -> np.ndarray:
        """(T,) bool: tracks that took part in the clustering (had usable crops)."""
        return np.isfinite(self.embeddings).all(axis=1)

    @property
    def problem_track_ids(self) -> list[str]:
        """Ids of the tracks with problems, each once, in ``tracks.csv`` order."""
        named = {problem.track_id for problem in self.problems}
        return [track_id for track_id in self.track_ids if track_id in named]


@dataclass(frozen=True, eq=False)
class AlignedTrackset:
    """A track dataset read and aligned: the pipeline's input (:mod:`vcn.pipeline`).

    Attributes:
        tracks: The ``tracks.csv`` table (:data:`vcn.formats.trackset.TRACKS_SCHEMA`), file order.
        problems: Per-track problems found while reading and aligning; these
            tracks have no chips below and stay Unknown.
        chips: The aligned chips of the tracks without problems, each with its
            row in ``tracks``.
        crops_by_method: Chips aligned by each method of :data:`vcn.faces.loose_crops.METHODS`.
        thumbnails: Track id -> the track's middle aligned chip (by frame).
        backbone: The pretrained backbone the chips are aligned for.
        timings: Seconds of the read, load_backbone (when loaded here) and align steps.
    """

    tracks: pl.DataFrame
    problems: list[TrackProblem]
    chips: ChipArray
    crops_by_method: dict[str, int]
    thumbnails: dict[str, np.ndarray]
    backbone: Backbone
    timings: dict[str, float]

    @property
    def track_ids(self) -> list[str]:
        return self.tracks["track_id"].to_list()


def cluster_trackset(
    directory: str | os.PathLike[str],
    *,
    backbone: Backbone | None = None,
    cannot_link: bool = True,
    quality: bool = True,
    progress: ProgressCallback | None = None,
    device: str | None = None,
    finetune: bool = True,
    similarity: str = "cosine",
    seed: int = 0,
) -> TracksetClustering:
    """Clusters the face tracks of a track dataset by identity.

    The dataset is read (and so validated) before the backbone is loaded, so a
    malformed file fails in a fraction of a second.

    Args:
        directory: The dataset folder (``tracks.csv``, ``crops.csv``).
        backbone: The face-ID backbone; by default a new install's
            (:data:`vcn.identity.backbone.DEFAULT_BACKBONE`), which needs no checkpoint.
        cannot_link: Forbid tracks on screen together (same shot, overlapping
            frames) from sharing a cluster, and from being matched as training
            pairs. Off reproduces the paper's method.
        quality: Leave low-quality tracks Unknown (SER-FIQ outliers of the
            movie); ignored for a backbone that cannot give stochastic passes
            (:func:`vcn.identity.quality.supports_quality`), such as an ONNX model.
        progress: Called as ``progress(step, done, total)`` during the align
            and embed steps.
        device: Where the default backbone runs (``"cpu"``, ``"cuda"``); by
            default CUDA when available. Ignored when ``backbone`` is given.
        finetune: Adapt the backbone to this dataset's crops first
            (:func:`vcn.pipeline.adapt`; its compute mode is chosen from the
            device and logged). Off clusters with the pretrained model.
        similarity: One of :data:`vcn.pipeline.SIMILARITIES`: ``"cosine"``
            between embeddings (the default), or ``"loss"``, the finetuned
            model's own loss, the paper's metric, read as a divergence between
            tracks (:class:`vcn.identity.selfsup.loss_metric.LossDivergence`; needs
            ``finetune``).
        seed: Seed of the finetuning; the same seed gives the same result on a CPU.

    Returns:
        Clusters per track with what led to them.

    Raises:
        ValueError: An unknown ``similarity``, ``"loss"`` without ``finetune``,
            or an unusable ``device``.
        TracksetError: A dataset file is missing or malformed (names the file and line).
        CheckpointError: The default backbone cannot be loaded.
    """
    from vcn.clustering.cannot_link import on_screen_together
    from vcn.clustering.parameter_free import UNKNOWN
    from vcn.identity.embeddings import unit_track_means
    from vcn.pipeline import adapt, check_similarity, cluster, embed

    check_similarity(similarity, finetune=finetune)
    aligned = align_trackset(directory, backbone=backbone, progress=progress, device=device)
    track_ids = aligned.track_ids
    n_tracks = len(track_ids)
    timings = dict(aligned.timings)
    pairs = on_screen_together(aligned.tracks) if cannot_link else None

    adaptation = adapt(aligned.backbone, aligned.chips, n_tracks, enabled=finetune, cannot_link=pairs, seed=seed)
    # The loss metric is the finetuned model's own; cosine embeddings come from the model the check keeps.
    finetuned = adaptation.model if similarity == "loss" else adaptation.used
    if adaptation.model is not None:
        timings["finetune"] = adaptation.seconds

    started = time.perf_counter()
    embedded = embed(
        aligned.backbone if finetuned is None else finetuned.backbone,
        aligned.chips,
        quality=quality,
        loss_metric=finetuned if similarity == "loss" else None,
        progress=None if progress is None else lambda done, total: progress("embed", done, total),
    )
    timings["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    result = cluster(embedded, n_tracks, similarity=similarity, cannot_link=pairs)
    timings["cluster"] = time.perf_counter() - started
    clusters = [None if label == UNKNOWN else str(int(label)) for label in result.labels]
    n_low_quality = int((np.asarray(result.low_quality) & (result.labels == UNKNOWN)).sum())
    logger.info(
        "clustered %d tracks into %d clusters in %.2f s (%s%s, %d merges or rounds, %s); %d Unknown (%d low quality, "
        "%d with problems)",
        n_tracks,
        result.n_clusters,
        timings["cluster"],
        result.clustering.rule,
        "" if result.clustering.cut is None else f" at {result.clustering.cut:.4f}",
        result.clustering.rounds,
        "cannot-link on" if cannot_link else "cannot-link off",
        result.n_unknown,
        n_low_quality,
        len({problem.track_id for problem in aligned.problems}),
    )

    return TracksetClustering(
        track_ids=track_ids,
        clusters=clusters,
        problems=aligned.problems,
        crops_by_method=aligned.crops_by_method,
        n_crops=len(embedded.crop_track),
        track_quality=np.asarray(result.track_quality, dtype=np.float64),
        embeddings=unit_track_means(embedded.embeddings, embedded.crop_track, n_tracks),
        thumbnails=aligned.thumbnails,
        n_clusters=int(result.n_clusters),
        n_unknown=int(result.n_unknown),
        n_low_quality=n_low_quality,
        quality_cut=float(result.quality_cut),
        model_version=embedded.model_version,
        dissimilarity=result.dissimilarity,
        timings=timings,
        finetuned=adaptation.model,
        not_finetuned=adaptation.skipped,
    )


def align_trackset(
    directory: str | os.PathLike[str],
    *,
    backbone: Backbone | None = None,
    progress: ProgressCallback | None = None,
    device: str | None = None,
) -> AlignedTrackset:
    """Reads a track dataset and aligns its crops for the backbone: the steps before :mod:`vcn.pipeline`.

    The clustering benchmark calls it once and runs the pipeline on the result
    many ways. Arguments and errors as :func:`cluster_trackset`.
    """
    from vcn.faces.loose_crops import METHODS, align_loose_crops
    from vcn.formats.trackset import read_trackset
    from vcn.pipeline import ChipArray

    timings: dict[str, float] = {}

    # Read and validate; labels.csv is never opened.
    started = time.perf_counter()
    trackset = read_trackset(directory)
    track_ids: list[str] = trackset.tracks["track_id"].to_list()
    timings["read"] = time.perf_counter() - started
    logger.info(
        "read %s: %d tracks, %d crops, %d track problem(s)",
        trackset.root,
        len(track_ids),
        trackset.crops.height,
        len(trackset.problems),
    )

    if backbone is None:
        import vcn

        started = time.perf_counter()
        backbone = vcn.load_backbone(device=device)
        timings["load_backbone"] = time.perf_counter() - started

    # Find and align the face in every crop of the tracks without problems.
    started = time.perf_counter()
    aligned = align_loose_crops(
        trackset,
        backbone.template,
        progress=None if progress is None else lambda done, total: progress("align", done, total),
    )
    timings["align"] = time.perf_counter() - started
    problems = [*trackset.problems, *aligned.problems]

    # A track with any problem takes no part (Unknown): keep the crops of the others.
    excluded = {problem.track_id for problem in problems}
    index = {track_id: i for i, track_id in enumerate(track_ids)}
    keep = np.array([track_id not in excluded for track_id in aligned.table["track_id"].to_list()], dtype=bool)
    chips = aligned.chips[keep]
    table = aligned.table.filter(keep)
    crop_track = np.array([index[track_id] for track_id in table["track_id"]], dtype=np.int64)
    crops_by_method = dict.fromkeys(METHODS, 0)
    for method in table["method"]:
        crops_by_method[method] += 1

    return AlignedTrackset(
        tracks=trackset.tracks,
        problems=problems,
        chips=ChipArray(chips, crop_track),
        crops_by_method=crops_by_method,
        thumbnails=_middle_chips(chips, crop_track, table["frame"].to_numpy(), track_ids),
        backbone=backbone,
        timings=timings,
    )


def _middle_chips(
    chips: np.ndarray, crop_track: np.ndarray, frames: np.ndarray, track_ids: list[str]
) -> dict[str, np.ndarray]:
    """Each track's middle chip by frame, keyed by track id; tracks without chips absent."""
    order = np.lexsort((frames, crop_track))  # by track, then frame
    thumbnails: dict[str, np.ndarray] = {}
    tracks_sorted = crop_track[order]
    starts = np.flatnonzero(np.r_[True, tracks_sorted[1:] != tracks_sorted[:-1]]) if len(order) else []
    ends = np.r_[starts[1:], len(order)] if len(order) else []
    for start, end in zip(starts, ends):
        row = order[(start + end - 1) // 2]
        thumbnails[track_ids[int(crop_track[row])]] = chips[row]
    return thumbnails
