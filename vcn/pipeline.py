"""The one pipeline from aligned face chips to identity clusters: adapt, embed, cluster.

A movie of our own and a track dataset from elsewhere reach the same point by
different roads: aligned chips, each with the track it belongs to. The movie's
come from its ``track_crops`` file (:class:`CropFile`, decoded a chunk at a
time); a track dataset's loose crops are found and aligned in memory
(:func:`vcn.faces.loose_crops.align_loose_crops`, then :class:`ChipArray`). From
there both run the same three functions, so that the same chips give the same
clusters whichever road they took:

1. :func:`adapt`: finetune the backbone to these chips (self-distillation in
   progressive rounds), or say why not;
2. :func:`embed`: embed every chip and, in the same pass, score its SER-FIQ
   quality and, when the clustering is to use the loss metric, give the head
   logits of a bounded sample of the chips;
3. :func:`cluster`: the parameter-free clustering of the tracks, by cosine or by
   the finetuned model's own loss.

The Dagster assets (``vcn_assets/assets/models.py``, ``clusters.py``) store what
each step gives between steps; ``vcn cluster-tracks``
(:func:`vcn.cluster_tracks.cluster_trackset`) runs them in one go.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import polars as pl

from vcn.memory import heap_reused, trim_heap
from vcn.progress import ProgressCallback

if TYPE_CHECKING:
    from vcn.clustering.parameter_free import MovieClusters
    from vcn.identity.backbone import Backbone
    from vcn.identity.selfsup.finetune import FinetunedModel
    from vcn.identity.selfsup.loss_metric import LossSample

logger = logging.getLogger(__name__)

#: How crops can be compared: cosine between embeddings, or the finetuned model's
#: own loss (the paper's metric, read as a divergence between tracks; it needs a finetuned model).
SIMILARITIES = ("cosine", "loss")

#: Chips embedded per step. SER-FIQ's dropout masks restart from their seed with
#: every chunk, so a crop's quality depends on its place in the chunk: both roads
#: chunk the same way, and the same chips in the same order score the same.
CHUNK_SIZE = 512

#: Most chips per forward pass on a CPU. There a pass of 16 chips runs as fast per chip as one
#: of 128, and its activations take a fifth of the memory
#: (``benchmarks/results/embed_cpu_batch.md``); a GPU takes the configured batch.
CPU_BATCH_SIZE = 16


class ChipSource(Protocol):
    """Aligned chips in a fixed order, with the track of each.

    Attributes:
        crop_track: (N,) int64 row of each chip's track in the caller's track table.
    """

    crop_track: np.ndarray

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """All chips in order, ``size`` at a time (the last chunk shorter): (n, S, S, 3) uint8 RGB."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The chips at ``rows`` (sorted, distinct positions), as one (M, S, S, 3) uint8 array."""
        ...


@dataclass(frozen=True, eq=False)
class ChipArray:
    """Aligned chips held in memory: a track dataset's, aligned from its loose crops.

    Attributes:
        chips: (N, S, S, 3) uint8 RGB chips.
        crop_track: (N,) int64 row of each chip's track.
    """

    chips: np.ndarray
    crop_track: np.ndarray

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.chips), size):
            yield self.chips[start : start + size]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.chips[rows]


@dataclass(frozen=True, eq=False)
class CropFile:
    """The kept crops of a movie's ``track_crops`` file, read without holding them all in memory.

    Attributes:
        path: The ``track_crops`` Parquet file.
        template: The alignment the backbone expects (checked against every crop).
        crops: ``crop_id`` and ``track_id`` of each kept crop, in file order.
        crop_track: (N,) int64 row of each kept crop's track in the movie's sorted track ids.
    """

    path: str | os.PathLike[str]
    template: str
    crops: pl.DataFrame
    crop_track: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike[str], template: str, track_ids: np.ndarray) -> CropFile:
        """The kept crops of ``path``, their tracks looked up in ``track_ids`` (sorted, from ``tracks.parquet``).

        Raises:
            ValueError: The crops were aligned for another template, or name a
                track that ``track_ids`` lacks.
        """
        from vcn.identity.embeddings import read_kept_crops

        crops = read_kept_crops(path, template)
        return cls(path, template, crops, track_rows(track_ids, crops["track_id"].to_numpy()))

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        from vcn.identity.embeddings import read_kept_chip_chunks

        return read_kept_chip_chunks(self.path, self.template, size)

    def take(self, rows: np.ndarray) -> np.ndarray:
        from vcn.identity.embeddings import read_kept_chips

        return read_kept_chips(self.path, self.template, rows)[1]


def track_rows(track_ids: np.ndarray, crop_tracks: np.ndarray) -> np.ndarray:
    """(N,) int64 row of each crop's track id in the sorted ``track_ids``.

    Raises:
        ValueError: A crop names a track that ``track_ids`` lacks.
    """
    track_ids, crop_tracks = np.asarray(track_ids), np.asarray(crop_tracks)
    rows = np.searchsorted(track_ids, crop_tracks)
    found = rows < len(track_ids)
    found[found] = track_ids[rows[found]] == crop_tracks[found]
    if not found.all():
        missing = sorted(set(crop_tracks[~found].tolist()))[:5]
        raise ValueError(f"crops name tracks that the track table lacks (e.g. {missing})")
    return rows.astype(np.int64)


# --- 1. adapt ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Adaptation:
    """What :func:`adapt` did.

    Attributes:
        model: The backbone adapted to the chips, or None when not finetuned.
        skipped: Why not finetuned, in words; None when finetuned.
        seconds: Wall time of the finetuning (0 when skipped).
    """

    model: FinetunedModel | None
    skipped: str | None
    seconds: float = 0.0

    @property
    def used(self) -> FinetunedModel | None:
        """The finetuned model that embeds the chips: None when there is none, or when the label-free
        check (:attr:`~vcn.identity.selfsup.finetune.FinetunedModel.steps_aside`) found it no better
        than the pretrained one."""
        return None if self.model is None or self.model.steps_aside else self.model


def adapt(
    backbone: Backbone,
    source: ChipSource,
    n_tracks: int,
    *,
    enabled: bool = True,
    cannot_link: np.ndarray | Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    progress: Callable[[int, int, int, float], None] | None = None,
    cpu_anyway: bool = False,
) -> Adaptation:
    """Finetunes ``backbone`` to the chips of ``source`` (:func:`~vcn.identity.selfsup.finetune.finetune_movie`).

    The compute mode follows the backbone's device
    (:func:`~vcn.identity.selfsup.finetune.compute_mode`). Memory stays bounded:
    only the crops the mode trains on (at most its ``max_crops``, an even subset
    of each track's beyond) are taken from the source.

    Args:
        backbone: The pretrained backbone; never modified.
        source: The chips and their tracks.
        n_tracks: Number of tracks (rows of the track table).
        enabled: Off: nothing is trained and the pretrained model stays.
        cannot_link: Track pairs on screen together, never matched as training pairs.
        seed: Seed of the finetuning; the same seed gives the same model on a CPU.
        progress: Called as ``progress(round, epoch, epochs, loss)`` after each epoch.
        cpu_anyway: Finetune a backbone of :data:`~vcn.identity.backbone.NOT_FINETUNED_ON_CPU` on a CPU
            all the same (the benchmarks measure what that gives).

    Returns:
        The finetuned model, or why there is none (turned off, a backbone
        without a torch module, a backbone not finetuned on a CPU, no chips).
    """
    from vcn.identity.backbone import NOT_FINETUNED_ON_CPU
    from vcn.identity.selfsup.finetune import compute_mode, finetune_movie
    from vcn.identity.selfsup.sampling import spread_crops

    n_crops = len(source.crop_track)
    skipped = None
    if not enabled:
        skipped = "finetuning is turned off"
    elif backbone.module is None:
        skipped = f"backbone {backbone.name} has no torch module to finetune (ONNX models only run)"
    elif backbone.name in NOT_FINETUNED_ON_CPU and not str(backbone.device).startswith("cuda") and not cpu_anyway:
        skipped = f"not finetuned on a CPU: {NOT_FINETUNED_ON_CPU[backbone.name]}"
    elif n_crops == 0:
        skipped = "there are no crops"
    if skipped is not None:
        logger.info("no finetuning: %s; the pretrained model %s is used", skipped, backbone.version)
        return Adaptation(None, skipped)
    started = time.perf_counter()
    mode = compute_mode(backbone.device, n_crops, seed)
    rows = spread_crops(source.crop_track, mode.config.max_crops)
    model = finetune_movie(
        backbone, source.take(rows), source.crop_track[rows], n_tracks, cannot_link=cannot_link, seed=seed, mode=mode,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    logger.info("finetuned %s in %.1f s (%s): %s", backbone.version, seconds, model.mode, model.version)
    if model.steps_aside:
        logger.info("the pretrained model %s embeds the chips: %s", backbone.version, model.steps_aside)
    return Adaptation(model, None, seconds)


# --- 2. embed ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Embedded:
    """Every chip of a source embedded: what :func:`cluster` takes.

    Attributes:
        crop_track: (N,) int64 row of each chip's track.
        embeddings: (N, D) float32 unit-length embeddings.
        quality: (N,) float32 SER-FIQ quality, or None when not scored (not
            asked, or a backbone that cannot give stochastic passes).
        model_version: Version of the weights that embedded the chips.
        loss: Head logits of a bounded sample of the chips and the finetuned
            loss metric; None unless asked for.
    """

    crop_track: np.ndarray
    embeddings: np.ndarray
    quality: np.ndarray | None
    model_version: str
    loss: LossSample | None = None


def embed(
    model: Backbone,
    source: ChipSource,
    *,
    quality: bool = True,
    loss_metric: FinetunedModel | None = None,
    max_loss_crops: int | None = None,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> Embedded:
    """Embeds every chip of ``source``, :data:`CHUNK_SIZE` at a time, and whatever else the clustering needs.

    Each chunk of chips is decoded once (a movie's) and gives, in the same pass,
    the embeddings, the quality (one trunk pass serves both:
    :func:`~vcn.identity.quality.embed_and_score`) and, with ``loss_metric``, the
    head logits of the chunk's chips that the loss metric compares
    (:func:`~vcn.identity.selfsup.loss_metric.loss_metric_rows`: all of them up
    to its cap, an even subset of each track's beyond).

    Args:
        model: The backbone that embeds: the finetuned one when there is one.
        source: The chips and their tracks.
        quality: Score each chip's SER-FIQ quality. A backbone that cannot give
            stochastic passes (an ONNX model) scores none, with a warning.
        loss_metric: The finetuned model (whose backbone is ``model``) when the
            clustering will compare crops by its loss.
        max_loss_crops: Most chips that get logits; default
            :data:`~vcn.identity.selfsup.loss_metric.MAX_CROPS`. Each costs K
            floats here and more in the clustering.
        batch_size: Chips per forward pass (at most :data:`CPU_BATCH_SIZE` on a CPU).
        progress: Called as ``progress(done, total)`` after each chunk.

    Returns:
        The embeddings, quality and (when asked) loss-metric logits of the chips.

    Raises:
        ValueError: ``loss_metric`` is not the model that embeds, or the source
            gave another number of chips than it has tracks for.
    """
    from vcn.identity.quality import embed_and_score, supports_quality
    from vcn.identity.selfsup.loss_metric import LossSample, loss_metric_rows

    crop_track = np.asarray(source.crop_track, dtype=np.int64)
    total = len(crop_track)
    scored = quality and supports_quality(model)
    if quality and not scored:
        logger.warning("backbone %s cannot score crop quality; no track is left out for quality", model.name)
    if loss_metric is not None and loss_metric.version != model.version:
        raise ValueError(f"the loss metric is that of {loss_metric.version}, the chips are embedded by {model.version}")
    loss_rows = None if loss_metric is None else loss_metric_rows(crop_track, max_loss_crops)
    if not str(model.device).startswith("cuda"):
        batch_size = min(batch_size, CPU_BATCH_SIZE)

    started = time.perf_counter()
    # The outputs are allocated whole before the loop: kept pieces allocated chunk after chunk would sit
    # between the freed blocks of the next batches in the C heap, which then grows past them (each chunk's
    # working set creeping up over a film's hundreds of chunks).
    embeddings = np.empty((total, model.dim), np.float32)
    qualities = np.empty(total, np.float32) if scored else None
    logits = None if loss_rows is None else np.empty((len(loss_rows), loss_metric.head.out_dim), np.float32)
    done = 0
    # Batch after batch allocates and frees the same activations: they stay in the heap meanwhile.
    with heap_reused():
        for chips in source.chunks(CHUNK_SIZE):
            if done + len(chips) > total:
                raise ValueError(f"the chip source gave more chips than its {total} crops")
            rows = slice(done, done + len(chips))
            if scored:
                embeddings[rows], qualities[rows] = embed_and_score(model, chips, batch_size=min(batch_size, 128))
            else:
                embeddings[rows] = model.embed(chips, batch_size=batch_size)
            if logits is not None:
                # The sampled chips of this chunk, while it is at hand.
                first, last = np.searchsorted(loss_rows, [done, done + len(chips)])
                if last > first:
                    logits[first:last] = loss_metric.logits(chips[loss_rows[first:last] - done], batch_size=batch_size)
            done += len(chips)
            trim_heap()  # the free pages of holes no batch can fit, once a chunk
            if progress is not None:
                progress(done, total)
    if done != total:
        raise ValueError(f"the chip source gave {done} chips for {total} crops")

    loss = None
    if loss_metric is not None:
        loss = LossSample(
            rows=loss_rows,
            logits=logits,
            metric=loss_metric.loss_dissimilarity(),
            model_version=loss_metric.version,
            device=str(model.device),
        )
    logger.info(
        "embedded %d crops with %s in %.1f s%s%s", total, model.version, time.perf_counter() - started,
        " (with quality)" if scored else "", "" if loss is None else f" (loss-metric logits of {len(loss.rows)})",
    )
    return Embedded(
        crop_track=crop_track,
        embeddings=embeddings,
        quality=qualities,
        model_version=model.version,
        loss=loss,
    )


# --- 3. cluster --------------------------------------------------------------------------------


def check_similarity(similarity: str, *, finetune: bool) -> None:
    """Refuses a similarity that cannot be had, before any work is done.

    Raises:
        ValueError: ``similarity`` is not one of :data:`SIMILARITIES`, or is
            ``"loss"`` without finetuning (the loss metric is the finetuned model's own loss).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if similarity == "loss" and not finetune:
        raise ValueError(
            "similarity 'loss' needs the finetuned model (it is the finetuned model's own loss): finetune, or use "
            "similarity 'cosine'"
        )


def cluster(
    embedded: Embedded,
    n_tracks: int,
    *,
    similarity: str = "cosine",
    cannot_link: np.ndarray | None = None,
    quality_screen: bool = True,
) -> MovieClusters:
    """Clusters the tracks of embedded chips (:func:`vcn.clustering.parameter_free.cluster_movie`).

    ``"cosine"`` compares the embeddings of all chips. ``"loss"`` compares the
    chips of the loss sample by the finetuned model's loss; each carries its
    track's mean quality when the sample is a subset
    (:func:`~vcn.identity.selfsup.loss_metric.sample_quality`), and the merge
    rounds' products run on the GPU when the logits came from a model on CUDA
    and this machine has it (the factors are as wide as the head's output).
    The loss metric needs a finetuned model: without one (finetuning off or
    impossible, so ``embedded`` carries no logits) the clustering is by cosine,
    with a warning, and the result says so.

    Args:
        embedded: What :func:`embed` gave (or its stored artifacts).
        n_tracks: Number of tracks T; ``embedded.crop_track`` is in ``0..T-1``.
        similarity: One of :data:`SIMILARITIES`.
        cannot_link: (P, 2) track pairs on screen together, never in one
            cluster; None switches the constraint off (the paper's method).
        quality_screen: Leave low-quality tracks Unknown (when quality was scored).

    Returns:
        Labels per track and what led to them; ``dissimilarity`` names the one used.

    Raises:
        ValueError: An unknown ``similarity``.
    """
    from vcn.clustering.parameter_free import cluster_movie
    from vcn.identity.quality import within_track_scatter
    from vcn.identity.selfsup.loss_metric import sample_quality

    check_similarity(similarity, finetune=True)
    outputs, crop_track, dissimilarity, device, scatter = embedded.embeddings, embedded.crop_track, None, None, None
    quality = embedded.quality if quality_screen else None
    if similarity == "loss" and embedded.loss is not None:
        sample = embedded.loss
        outputs, crop_track, dissimilarity = sample.logits, embedded.crop_track[sample.rows], sample.metric
        # The screen's noise floor from every crop's own quality, not the track means the sample carries.
        scatter = None if quality is None else within_track_scatter(quality, embedded.crop_track)
        quality = sample_quality(quality, embedded.crop_track, sample.rows)
        device = _cuda_if_there(sample.device)
        if len(sample.rows) < len(embedded.crop_track):
            logger.info("loss metric on %d of the %d crops, every track kept", len(sample.rows), len(embedded.crop_track))
    elif similarity == "loss" and len(embedded.crop_track):
        logger.warning("no finetuned model's logits: clustering by cosine, not the loss metric")
    return cluster_movie(
        outputs,
        crop_track,
        n_tracks,
        cannot_link=cannot_link,
        crop_quality=quality,
        quality_scatter=scatter,
        dissimilarity=dissimilarity,
        device=device,
    )


def _cuda_if_there(model_device: str) -> str | None:
    """``model_device`` when it is a CUDA device and this machine has CUDA; else None (the CPU)."""
    if not model_device.startswith("cuda"):
        return None
    import torch

    return model_device if torch.cuda.is_available() else None
