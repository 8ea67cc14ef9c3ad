"""A preview video: the movie with each track's box and its person, for checking results by eye.

Every frame of the movie is decoded once, downscaled to at most :data:`PREVIEW_HEIGHT`
lines, drawn on (a box per track on that frame, from
:func:`vcn.faces.tracking.boxes_every_frame`, and its label) and encoded as H.264.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from vcn.media.decode import VideoReader
from vcn.media.probe import probe_video
from vcn.progress import ProgressCallback
from vcn.stores.files import atomic_path

#: The preview's largest height (lines); a taller movie is scaled down, keeping its shape.
PREVIEW_HEIGHT = 720
#: Box colours (RGB) by cluster number, cycled; Unknown tracks are grey.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
)
UNKNOWN_COLOUR = (160, 160, 160)


@dataclass(frozen=True)
class TrackLabel:
    """What a track's box says: its cluster's analyst name or number, or Unknown (``cluster`` None)."""

    cluster: int | None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.cluster is None:
            return "Unknown"
        return self.name or f"#{self.cluster}"

    @property
    def colour(self) -> tuple[int, int, int]:
        return UNKNOWN_COLOUR if self.cluster is None else PALETTE[self.cluster % len(PALETTE)]


@dataclass(frozen=True)
class PreviewReport:
    """What :func:`render_preview` wrote."""

    path: Path
    frames: int
    width: int
    height: int
    boxes_drawn: int


def preview_max_side(width: int, height: int) -> int:
    """The longer side that keeps a ``width`` x ``height`` picture at most :data:`PREVIEW_HEIGHT` lines tall."""
    scale = min(1.0, PREVIEW_HEIGHT / height)
    return int(round(max(width, height) * scale))


def render_preview(
    video: str | os.PathLike,
    out: str | os.PathLike,
    boxes: pl.DataFrame,
    labels: dict[int, TrackLabel],
    progress: ProgressCallback | None = None,
) -> PreviewReport:
    """Writes ``out`` (MP4, H.264): ``video`` with a box and label for every row of ``boxes`` on its frame.

    Args:
        video: The movie's video file.
        out: The MP4 to write; replaced only once it is complete.
        boxes: ``frame``, ``track_id``, ``x1``, ``y1``, ``x2``, ``y2`` in the video's displayed pixels
            (:func:`vcn.faces.tracking.boxes_every_frame`); rows without a track are not drawn.
        labels: Each track's label; a track missing here is drawn as Unknown.
        progress: Called as ``progress(frames so far, frames of the movie)`` while it renders.

    Returns:
        Where it went and what it holds.
    """
    import av

    info = probe_video(video)
    reader = VideoReader(video, info=info, max_side=preview_max_side(info.width, info.height), progress=progress)
    scale = 1.0 / reader.scale
    drawn = boxes.filter(pl.col("track_id").is_not_null()).sort("frame")
    frames = drawn["frame"].to_numpy()
    tracks = drawn["track_id"].to_numpy()
    corners = np.round(drawn.select("x1", "y1", "x2", "y2").to_numpy() * scale).astype(np.int64)
    starts = np.searchsorted(frames, np.arange(0, int(frames.max(initial=-1)) + 2))
    rate = Fraction(info.fps).limit_denominator(1001) if info.fps else Fraction(25)
    n_frames = n_boxes = 0
    out = Path(out)
    with atomic_path(out, suffix=".partial.mp4") as temporary:
        with av.open(str(temporary), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate, options={"preset": "veryfast", "crf": "23"})
            stream.width, stream.height, stream.pix_fmt = reader.out_width, reader.out_height, "yuv420p"
            for frame in reader.frames():
                image = np.ascontiguousarray(frame.image)
                if frame.index + 1 < len(starts):
                    for row in range(starts[frame.index], starts[frame.index + 1]):
                        _draw(image, corners[row], labels.get(int(tracks[row]), TrackLabel(None)))
                        n_boxes += 1
                picture = av.VideoFrame.from_ndarray(image, format="rgb24")
                picture.pts, picture.time_base = n_frames, 1 / rate
                container.mux(stream.encode(picture))
                n_frames += 1
            container.mux(stream.encode())
    return PreviewReport(path=out, frames=n_frames, width=reader.out_width, height=reader.out_height, boxes_drawn=n_boxes)


def _draw(image: np.ndarray, corners: np.ndarray, label: TrackLabel) -> None:
    x1, y1, x2, y2 = (int(v) for v in corners)
    thickness = max(2, image.shape[0] // 240)
    cv2.rectangle(image, (x1, y1), (x2, y2), label.colour, thickness)
    font, size = cv2.FONT_HERSHEY_SIMPLEX, max(0.45, image.shape[0] / 1100)
    (w, h), base = cv2.getTextSize(label.text, font, size, 1)
    top = max(0, y1 - h - base - 2)
    cv2.rectangle(image, (x1, top), (x1 + w + 4, top + h + base + 2), label.colour, cv2.FILLED)
    cv2.putText(image, label.text, (x1 + 2, top + h + 1), font, size, (0, 0, 0), 1, cv2.LINE_AA)
