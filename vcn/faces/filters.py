"""The three crop filters of the method: face area, top-K largest faces per frame, blur.

They mark crops as rejected with a reason instead of deleting them, so that a
user can see what was left out and why, and re-filter with other settings
without re-running detection.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import polars as pl

#: Reject reasons, in the order they are checked; a crop gets the first that applies.
#: ``unalignable`` (landmarks too degenerate to define an alignment) is set by the crops stage.
REASONS = ("small_face", "not_top_k", "blurry", "unalignable")


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the crop filters.

    Attributes:
        min_face_area: Smallest face box area in original-video pixels (40 x 40 by
            default): below it a face carries too little identity detail.
        top_k: Only the K largest faces of a frame are kept; crowds and
            background extras are not the characters the product clusters.
        min_sharpness: Smallest :func:`sharpness` of the aligned crop. On our
            test footage dark, defocused audience faces score 2-10, soft but
            recognisable faces 15-40 and faces in focus 60 and more.
    """

    min_face_area: float = 1600.0
    top_k: int = 5
    min_sharpness: float = 15.0


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


def reject_reason(face_area: float, frame_rank: int, sharp: float, config: FilterConfig) -> str | None:
    """The first filter a crop fails, or None when it passes all three."""
    if face_area < config.min_face_area:
        return "small_face"
    if frame_rank >= config.top_k:
        return "not_top_k"
    if sharp < config.min_sharpness:
        return "blurry"
    return None
