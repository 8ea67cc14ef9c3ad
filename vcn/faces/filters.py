"""The three crop filters of the method, judged against the movie: face size, top-K faces per frame, blur.

They mark crops as rejected with a reason instead of deleting them, so that a
user can see what was left out and why. Nothing here is a setting to tune: the
size and blur cuts come from the movie itself, between bounds measured once on
what the face-ID model can still recognise.

**Against the movie.** A crop is a small face, or a blurry one, when it is a
low-side outlier of the movie's own faces: its face height, or its
:func:`sharpness`, below ``exp(median - 3 * MAD)`` of the logarithms over the
movie's candidate crops (alignable, among the K largest of their frame), the
rule DESIGN.md uses for track quality. Logarithms, because both are scales: a
movie encoded at a third of the resolution has every face a third as tall, and
soft optics or a low bit rate divide every face's Laplacian variance roughly
alike, so the cuts move with the movie, and between the bounds below a 360p
upload is judged as its 1080p master would be.

**Bounds measured on the backbone** (``benchmarks/filter_floors.py``,
``benchmarks/results/filter_floors.md``: 576 CelebA faces of 144 people, dlib's
ResNet, leave-one-out 1-nearest-neighbour identification against the other
faces at full size; 0.943 for the full-size faces, 0.005 by chance):

- *Floors*, below which no movie makes a face worth clustering: a face box
  :data:`MIN_FACE_HEIGHT` (10) px tall is identified 3.8 % of the time (12 px:
  10 %, 8 px: 0.9 %); a face blurred to a median sharpness of 7.6 (Gaussian of
  sigma 6 % of the face height) 3.1 % (sharpness 9.8: 6.4 %, 5.4: 1.0 %). Below
  :data:`MIN_FACE_HEIGHT` or :data:`MIN_SHARPNESS` (8) a crop is never kept.
- *Ceilings*, above which no movie makes a face too small or too blurred:
  faces :data:`SAFE_FACE_HEIGHT` (40) px tall are identified 92.2 % of the time,
  within 2.5 points of full size (48 px: 93.2 %, 32 px: 86.8 %); the median
  sharpness of such faces is 174, of faces blurred by 1 % of their height (93.2 %)
  210, so a crop of sharpness :data:`SAFE_SHARPNESS` (175) or more is never blurry.
  The size ceiling is the old fixed threshold (40 x 40 px), which now applies
  only to a movie whose own faces would set a higher cut.

**A track keeps its best crops.** When every crop of a track fails, the track
keeps its :data:`BEST_CROPS_KEPT` best crops that clear the floors (closest to
passing both cuts), instead of vanishing from the clustering whole. A track with
no such crop is not a face worth clustering and keeps none: every crop is
unalignable, never among the K largest faces of its frame (a crowd's
background), or below a floor (identified at about chance).

On the Hamilton test clip (640x360, 81 crops of 14 tracks) the faces' heights
give a cut of 45 px, held at the 40 px ceiling; its sharpness spans 2 to 1,440
(stage lights, a dark audience), so the movie's own blur cut (0.06) falls to the
floor of 8. The pianist far away at the piano (a face 28-30 px tall, sharpness
17-27), rejected whole by the old fixed 40 x 40 px, keeps its three crops as its
best; an audience member's defocused face keeps its five crops of sharpness
9-13 (not its three of 6-8); four dark, defocused audience tracks (sharpness
1.7-5.6) keep none. The Laplacian variance also falls with contrast: a dark
face scores lower than a lit one as sharp, so floors measured on lit faces keep
a dark face only when it is sharper still.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import polars as pl

#: Reject reasons, in the order they are checked; a crop gets the first that applies.
#: ``unalignable`` (landmarks too degenerate to define an alignment) is set by the crops stage.
REASONS = ("small_face", "not_top_k", "blurry", "unalignable")

#: Face box height (px of the original video) below which a crop is never kept (see the module docstring).
MIN_FACE_HEIGHT = 10.0
#: :func:`sharpness` below which a crop is never kept.
MIN_SHARPNESS = 8.0
#: Face box height from which a crop is never a small face, whatever the movie.
SAFE_FACE_HEIGHT = 40.0
#: :func:`sharpness` from which a crop is never blurry, whatever the movie.
SAFE_SHARPNESS = 175.0
#: Outliers lie this many median absolute deviations (of the logarithm) below the median.
OUTLIER_MADS = 3.0
#: Crops a track keeps when all of its crops fail. Its crops give the pairs that the first
#: finetuning round trains on and that set its cluster's threshold (the mean dissimilarity over
#: its crop pairs): two crops give one pair, whose one misaligned crop would set that threshold
#: alone; three give three pairs, and the quality screen a spread within the track.
BEST_CROPS_KEPT = 3


@dataclass(frozen=True)
class FilterConfig:
    """Settings of the crop filters; the defaults judge every movie by its own faces.

    Attributes:
        top_k: Only the K largest faces of a frame are kept; crowds and
            background extras are not the characters the product clusters.
        min_face_area: A fixed smallest face box area (px of the original video)
            instead of the movie's own cut; None (the default) judges the movie.
        min_sharpness: A fixed smallest :func:`sharpness` instead of the movie's
            own cut; None (the default) judges the movie.
    """

    top_k: int = 5
    min_face_area: float | None = None
    min_sharpness: float | None = None


def face_rank_in_frame(detections: pl.DataFrame) -> pl.Series:
    """0-based rank of each detection by box area within its frame (0 = largest)."""
    area = (pl.col("x2") - pl.col("x1")) * (pl.col("y2") - pl.col("y1"))
    return detections.select(
        area.rank(method="ordinal", descending=True).over("frame").cast(pl.Int32).alias("frame_rank") - 1
    )["frame_rank"]


#: Side of the image on which sharpness is measured.
SHARPNESS_SIDE = 64


def sharpness(chip: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop at 64 x 64 px: low for blurred faces.

    Measuring at a fixed small size makes the score independent of how much the
    alignment magnified the face: a small face upscaled to a 150 px chip would
    otherwise look blurred however sharp it was in the frame.
    """
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(small.astype(np.float32), cv2.CV_32F).var())


def movie_cut(values: np.ndarray, floor: float, ceiling: float) -> float:
    """The movie's low-side outlier cut of a positive scale, ``exp(median - 3 MAD)`` of its logarithm.

    Clamped to ``[floor, ceiling]``; ``floor`` when there are no values.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) == 0:
        return float(floor)
    logs = np.log(values)
    median = float(np.median(logs))
    mad = float(np.median(np.abs(logs - median)))
    return float(np.clip(np.exp(median - OUTLIER_MADS * mad), floor, ceiling))


def reject_reason(
    face_height: float, frame_rank: int, sharp: float, top_k: int, min_height: float, min_sharp: float
) -> str | None:
    """The first filter a crop fails against the given cuts, or None when it passes all three."""
    if face_height < min_height:
        return "small_face"
    if frame_rank >= top_k:
        return "not_top_k"
    if sharp < min_sharp:
        return "blurry"
    return None


@dataclass(frozen=True)
class MovieCuts:
    """The cuts a movie's crops are judged by.

    Attributes:
        min_face_height: Smallest face box height (px of the original video) of a kept crop.
        min_sharpness: Smallest :func:`sharpness` of a kept crop.
    """

    min_face_height: float
    min_sharpness: float


def _columns(crops: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Face height, sharpness, frame rank, track and alignability of every crop."""
    height = np.sqrt(np.maximum(crops["face_area"].to_numpy().astype(np.float64), 0.0))
    sharp = crops["sharpness"].to_numpy().astype(np.float64)
    rank = crops["frame_rank"].to_numpy().astype(np.int64)
    tracks = crops["track_id"].to_numpy().astype(np.int64)
    alignable = (crops["reject_reason"].fill_null("") != "unalignable").to_numpy()
    return height, sharp, rank, tracks, alignable


def movie_cuts(crops: pl.DataFrame, config: FilterConfig = FilterConfig()) -> MovieCuts:
    """The movie's small-face and blur cuts, from its candidate crops (alignable, among the K largest of their frame).

    Args:
        crops: A movie's crops, as :func:`judge_crops` takes them (or the table it judged).
        config: ``top_k`` and optional fixed cuts, which replace the movie's.
    """
    height, sharp, rank, _, alignable = _columns(crops)
    candidate = alignable & (rank < config.top_k)
    if config.min_face_area is None:
        min_height = movie_cut(height[candidate], MIN_FACE_HEIGHT, SAFE_FACE_HEIGHT)
    else:
        min_height = float(np.sqrt(max(config.min_face_area, 0.0)))
    if config.min_sharpness is None:
        min_sharp = movie_cut(sharp[candidate], MIN_SHARPNESS, SAFE_SHARPNESS)
    else:
        min_sharp = float(config.min_sharpness)
    return MovieCuts(min_face_height=min_height, min_sharpness=min_sharp)


def judge_crops(crops: pl.DataFrame, config: FilterConfig = FilterConfig()) -> list[str | None]:
    """The filters' verdict on every crop of a movie, each judged against the movie's crops.

    Args:
        crops: One row per crop with ``track_id``, ``face_area`` (box area, px),
            ``frame_rank`` (:func:`face_rank_in_frame`), ``sharpness`` and
            ``reject_reason`` (``"unalignable"`` for crops that could not be
            aligned, else null); any order.
        config: ``top_k`` and optional fixed cuts.

    Returns:
        The reject reason of each crop in the rows' order, None for a kept crop
        (including a track's best crops kept although they fail a cut).
    """
    n = crops.height
    height, sharp, rank, tracks, alignable = _columns(crops)
    candidate = alignable & (rank < config.top_k)
    cuts = movie_cuts(crops, config)
    min_height, min_sharp = cuts.min_face_height, cuts.min_sharpness

    reasons: list[str | None] = [
        "unalignable"
        if not alignable[i]
        else reject_reason(height[i], int(rank[i]), sharp[i], config.top_k, min_height, min_sharp)
        for i in range(n)
    ]
    kept = np.array([r is None for r in reasons], dtype=bool)
    # A track whose crops all fail keeps its best few that clear the floors.
    eligible = candidate & (height >= MIN_FACE_HEIGHT) & (sharp >= MIN_SHARPNESS) & ~kept
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.minimum(np.log(height / min_height), np.log(sharp / min_sharp))
    track_index = np.unique(tracks, return_inverse=True)[1].reshape(-1)
    has_kept = np.bincount(track_index, weights=kept, minlength=int(track_index.max(initial=-1)) + 1) > 0
    rows = np.flatnonzero(eligible & ~has_kept[track_index])
    rows = rows[np.lexsort((-margin[rows], track_index[rows]))]  # by track, then best first
    group = track_index[rows]
    first = np.r_[True, group[1:] != group[:-1]] if len(rows) else np.zeros(0, bool)
    start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0)) if len(rows) else np.zeros(0, np.int64)
    rescued = np.zeros(n, dtype=bool)
    rescued[rows[np.arange(len(rows)) - start < BEST_CROPS_KEPT]] = True
    for i in np.flatnonzero(rescued):
        reasons[i] = None
    return reasons


def track_reject_reason(reasons: list[str | None]) -> str | None:
    """Why a track has no kept crop: its crops' most frequent reason (ties in :data:`REASONS` order).

    None when the track has a kept crop.
    """
    if any(r is None for r in reasons):
        return None
    if not reasons:
        return "no_crops"
    counts = {r: reasons.count(r) for r in REASONS}
    return max(REASONS, key=lambda r: (counts[r], -REASONS.index(r)))
