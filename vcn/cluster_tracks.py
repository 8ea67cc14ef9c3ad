"""Clustering the face tracks of a track dataset: the product behind ``vcn cluster-tracks``.

A track dataset (``shared/formats/trackset-v1.md``) holds tracks detected and
tracked elsewhere, each a list of loose face crops. :func:`cluster_trackset`
runs them through the same steps as a movie of our own, minus detection and
tracking:

1. read ``tracks.csv`` and ``crops.csv`` (never ``labels.csv``: the ground truth
   plays no part in clustering);
2. find and align the face in every crop for the backbone's template;
3. embed the aligned chips and, in the same pass, score each crop's quality
   (SER-FIQ) when the backbone allows it;
4. cluster the tracks, with cannot-link between tracks on screen together.

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

logger = logging.getLogger(__name__)

#: The steps timed by :func:`cluster_trackset`, in order ("finetune" only when finetuning).
STEPS = ("read", "align", "finetune", "embed", "cluster")

#: The dissimilarities :func:`cluster_trackset` offers: the finetuned model's own
#: loss (the paper's) or cosine between embeddings.
SIMILARITIES = ("loss", "cosine")

#: Called as ``progress(step, done, total)`` while a step runs; ``step`` is one of :data:`STEPS`.
ProgressCallback = Callable[[str, int, int], None]

#: Chips per embedding / quality call: a progress tick every this many crops.
CHUNK_SIZE = 512


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
        n_low_quality: Tracks left Unknown by the quality screen.
        quality_cut: The movie's quality cut (-inf when quality was not used).
        model_version: Version of the backbone's weights, for lineage.
        dissimilarity: Name of the dissimilarity the clustering used.
        timings: Seconds per step in the order run: :data:`STEPS` (the embed
            step includes quality scoring), with ``"load_backbone"`` after ``"read"`` when the
            default backbone was loaded here, and ``"finetune"`` before ``"embed"`` when finetuned.
        finetune: What the finetuning did (compute mode, base and finetuned
            versions, rounds, pairs/s, seconds, collapse problems); None without it.
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
    finetune: dict | None = None

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
class EmbeddedTrackset:
    """A track dataset read, aligned and embedded: everything the clustering takes.

    Attributes:
        tracks: The ``tracks.csv`` table (:data:`vcn.formats.trackset.TRACKS_SCHEMA`), file order.
        problems: Per-track problems found while reading and aligning; these
            tracks have no crops below and stay Unknown.
        crop_track: (N,) row in ``tracks`` of each embedded crop.
        embeddings: (N, D) float32 unit-length crop embeddings.
        quality: (N,) float32 SER-FIQ crop quality, or None when not scored.
        crops_by_method: Crops aligned by each method of :data:`vcn.faces.loose_crops.METHODS`.
        thumbnails: Track id -> the track's middle aligned chip (by frame).
        model_version: Version of the weights that embedded the crops (the
            finetuned model's when finetuned).
        timings: Seconds of the read, load_backbone (when loaded here), align,
            finetune (when finetuned) and embed steps.
        logits: (N, K) head logits of the finetuned student, for the loss
            metric; None unless asked for.
        finetuned: The model adapted to this dataset, or None without finetuning.
    """

    tracks: pl.DataFrame
    problems: list[TrackProblem]
    crop_track: np.ndarray
    embeddings: np.ndarray
    quality: np.ndarray | None
    crops_by_method: dict[str, int]
    thumbnails: dict[str, np.ndarray]
    model_version: str
    timings: dict[str, float]
    logits: np.ndarray | None = None
    finetuned: FinetunedModel | None = None

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
        backbone: The face-ID backbone; by default dlib's ResNet
            (``vcn.load_backbone("dlib-resnet")``), which needs no checkpoint.
        cannot_link: Forbid tracks on screen together (same shot, overlapping
            frames) from sharing a cluster. Off reproduces the paper's method.
        quality: Leave low-quality tracks Unknown (SER-FIQ outliers of the
            movie); ignored for a backbone that cannot give stochastic passes
            (:func:`vcn.identity.quality.supports_quality`), such as an ONNX model.
        progress: Called as ``progress(step, done, total)`` during the align
            and embed steps.
        device: Where the default backbone runs (``"cpu"``, ``"cuda"``); by
            default CUDA when available. Ignored when ``backbone`` is given.
        finetune: Adapt the backbone to this dataset's crops first
            (:func:`vcn.identity.selfsup.finetune.finetune_movie`; its compute mode is
            chosen from the device and logged). Off clusters with the pretrained model.
        similarity: ``"cosine"``: cosine between embeddings (the default);
            ``"loss"``: the finetuned model's symmetrised loss between crops, the
            paper's metric (needs ``finetune``; it over-splits after our CPU-budget
            finetuning, see ``benchmarks/results/cluster_quality.md``).
        seed: Seed of the finetuning; the same seed gives the same result on a CPU.

    Returns:
        Clusters per track with what led to them.

    Raises:
        TracksetError: A dataset file is missing or malformed (names the file and line).
        CheckpointError: The default backbone cannot be loaded.
        ValueError: An unusable ``device``.
    """
    from vcn.clustering.cannot_link import on_screen_together
    from vcn.clustering.parameter_free import UNKNOWN, cluster_movie
    from vcn.identity.embeddings import unit_track_means

    embedded = embed_trackset(
        directory, backbone=backbone, quality=quality, progress=progress, device=device, finetune=finetune,
        similarity=similarity, cannot_link=cannot_link, seed=seed,
    )
    track_ids = embedded.track_ids
    n_tracks = len(track_ids)
    timings = dict(embedded.timings)

    # Cluster the tracks.
    started = time.perf_counter()
    pairs = on_screen_together(embedded.tracks) if cannot_link else None
    if similarity == "loss" and len(embedded.crop_track):
        outputs, dissimilarity = embedded.logits, embedded.finetuned.loss_dissimilarity()
        # The loss metric's factors are as wide as the head's output: its matrices go to the GPU when there is one.
        model_device = str(embedded.finetuned.backbone.device)
        cluster_device = model_device if model_device.startswith("cuda") else None
    else:
        outputs, dissimilarity, cluster_device = embedded.embeddings, None, None
    result = cluster_movie(
        outputs, embedded.crop_track, n_tracks, cannot_link=pairs, crop_quality=embedded.quality,
        dissimilarity=dissimilarity, device=cluster_device,
    )
    timings["cluster"] = time.perf_counter() - started
    clusters = [None if label == UNKNOWN else str(int(label)) for label in result.labels]
    n_low_quality = int(np.asarray(result.low_quality).sum())
    logger.info(
        "clustered %d tracks into %d clusters in %.2f s (%d rounds, %s); %d Unknown (%d low quality, %d with problems)",
        n_tracks,
        result.n_clusters,
        timings["cluster"],
        result.clustering.rounds,
        "cannot-link on" if cannot_link else "cannot-link off",
        result.n_unknown,
        n_low_quality,
        len({problem.track_id for problem in embedded.problems}),
    )

    return TracksetClustering(
        track_ids=track_ids,
        clusters=clusters,
        problems=embedded.problems,
        crops_by_method=embedded.crops_by_method,
        n_crops=len(embedded.crop_track),
        track_quality=np.asarray(result.track_quality, dtype=np.float64),
        embeddings=unit_track_means(embedded.embeddings, embedded.crop_track, n_tracks),
        thumbnails=embedded.thumbnails,
        n_clusters=int(result.n_clusters),
        n_unknown=int(result.n_unknown),
        n_low_quality=n_low_quality,
        quality_cut=float(result.quality_cut),
        model_version=embedded.model_version,
        dissimilarity=result.dissimilarity,
        timings=timings,
        finetune=None if embedded.finetuned is None else _finetune_summary(embedded.finetuned),
    )


def _finetune_summary(model: FinetunedModel) -> dict:
    """The facts of a finetuning run worth printing and storing."""
    history = model.history
    return {
        "mode": model.mode,
        "base_version": model.base_version,
        "version": model.version,
        "rounds": len(history.get("rounds", [])),
        "stopped": history.get("stopped"),
        "pairs_per_second": history.get("pairs_per_second"),
        "bank_seconds": history.get("bank_seconds"),
        "seconds": history.get("seconds"),
        "final_loss": model.collapse.final_loss if model.collapse else None,
        "collapse_problems": model.collapse.problems() if model.collapse else [],
    }


def embed_trackset(
    directory: str | os.PathLike[str],
    *,
    backbone: Backbone | None = None,
    quality: bool = True,
    progress: ProgressCallback | None = None,
    device: str | None = None,
    finetune: bool = False,
    similarity: str = "cosine",
    cannot_link: bool = True,
    seed: int = 0,
) -> EmbeddedTrackset:
    """Steps 1-3 of :func:`cluster_trackset`: read, align, finetune (when asked), embed (and score quality).

    The clustering benchmark calls it and clusters the result many ways.
    Arguments and errors as :func:`cluster_trackset`; ``cannot_link`` here only
    keeps tracks on screen together from being matched as training pairs.

    Raises:
        ValueError: ``similarity`` is unknown, or ``"loss"`` without ``finetune``.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if similarity == "loss" and not finetune:
        raise ValueError("the loss similarity is the finetuned model's own loss: finetune, or use similarity 'cosine'")
    from vcn.faces.loose_crops import METHODS, align_loose_crops
    from vcn.formats.trackset import read_trackset
    from vcn.identity.quality import embed_and_score, supports_quality

    timings: dict[str, float] = {}

    # Read and validate; labels.csv is never opened.
    started = time.perf_counter()
    trackset = read_trackset(directory)
    track_ids: list[str] = trackset.tracks["track_id"].to_list()
    n_tracks = len(track_ids)
    timings["read"] = time.perf_counter() - started
    logger.info(
        "read %s: %d tracks, %d crops, %d track problem(s)",
        trackset.root,
        n_tracks,
        trackset.crops.height,
        len(trackset.problems),
    )

    if backbone is None:
        import vcn

        started = time.perf_counter()
        backbone = vcn.load_backbone("dlib-resnet", device=device)
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
    table_tracks = aligned.table["track_id"].to_list()
    keep = np.array([track_id not in excluded for track_id in table_tracks], dtype=bool)
    chips = aligned.chips[keep]
    table = aligned.table.filter(keep)
    crop_track = np.array([index[track_id] for track_id in table["track_id"]], dtype=np.int64)
    crops_by_method = dict.fromkeys(METHODS, 0)
    for method in table["method"]:
        crops_by_method[method] += 1

    # Adapt the backbone to these crops (progressive self-distillation rounds).
    finetuned = None
    if finetune and len(chips):
        from vcn.clustering.cannot_link import on_screen_together
        from vcn.identity.selfsup.finetune import finetune_movie

        started = time.perf_counter()
        pairs = on_screen_together(trackset.tracks) if cannot_link else None
        finetuned = finetune_movie(backbone, chips, crop_track, n_tracks, cannot_link=pairs, seed=seed)
        timings["finetune"] = time.perf_counter() - started
        logger.info("finetuned %s in %.1f s (%s): %s", backbone.version, timings["finetune"], finetuned.mode,
                    finetuned.version)
        backbone = finetuned.backbone

    # Embed the chips, and score their SER-FIQ quality in the same trunk pass when asked and possible.
    started = time.perf_counter()
    qualities = None
    if quality and supports_quality(backbone):

        def embed_with_quality(part: np.ndarray) -> np.ndarray:
            embeddings, scores = embed_and_score(backbone, part)
            return np.concatenate([embeddings, scores[:, None]], axis=1)

        both = _in_chunks(embed_with_quality, chips, "embed", progress, np.zeros((0, backbone.dim + 1), np.float32))
        outputs, qualities = np.ascontiguousarray(both[:, :-1]), both[:, -1].copy()
    else:
        if quality:
            logger.warning("backbone %s cannot score crop quality; no track is left out for quality", backbone.name)
        outputs = _in_chunks(backbone.embed, chips, "embed", progress, np.zeros((0, backbone.dim), np.float32))
    logits = finetuned.logits(chips) if similarity == "loss" and finetuned is not None else None
    timings["embed"] = time.perf_counter() - started
    logger.info("embedded %d crops with %s in %.1f s%s", len(chips), backbone.version, timings["embed"],
                "" if qualities is None else " (with quality)")

    return EmbeddedTrackset(
        tracks=trackset.tracks,
        problems=problems,
        crop_track=crop_track,
        embeddings=outputs,
        quality=qualities,
        crops_by_method=crops_by_method,
        thumbnails=_middle_chips(chips, crop_track, table["frame"].to_numpy(), track_ids),
        model_version=backbone.version,
        timings=timings,
        logits=logits,
        finetuned=finetuned,
    )


def _in_chunks(
    run: Callable[[np.ndarray], np.ndarray],
    chips: np.ndarray,
    step: str,
    progress: ProgressCallback | None,
    empty: np.ndarray,
) -> np.ndarray:
    """``run`` over ``chips`` in chunks of :data:`CHUNK_SIZE`, ticking ``progress`` after each; ``empty`` for no chips."""
    parts = []
    for start in range(0, len(chips), CHUNK_SIZE):
        parts.append(run(chips[start : start + CHUNK_SIZE]))
        if progress is not None:
            progress(step, min(start + CHUNK_SIZE, len(chips)), len(chips))
    return np.concatenate(parts) if parts else empty


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
