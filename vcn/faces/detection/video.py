"""Running a face detector over the sampled frames of a video."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import polars as pl

from vcn.faces.detection.base import LANDMARK_NAMES, Detections, FaceDetector
from vcn.faces.tracking import THUMB_SIDE, appearance_thumbnail
from vcn.media import DecodedFrame, VideoReader

if TYPE_CHECKING:
    from vcn.faces.crops import ChipWriter

LANDMARK_COLUMNS = [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y")]

#: Schema of the ``face_detections`` table, one row per face per sampled frame.
#: Coordinates are pixels of the upright video at its original resolution.
#: ``appearance`` is the tracker's int8-quantised grey thumbnail (256 bytes).
DETECTIONS_SCHEMA = {
    "detection_id": pl.Int64,
    "frame": pl.Int64,
    "shot_id": pl.Int32,
    "time_s": pl.Float64,
    "x1": pl.Float32,
    "y1": pl.Float32,
    "x2": pl.Float32,
    "y2": pl.Float32,
    "score": pl.Float32,
    **{c: pl.Float32 for c in LANDMARK_COLUMNS},
    "appearance": pl.Binary,
}


def detect_video_faces(
    reader: VideoReader,
    frames: pl.DataFrame,
    detector: FaceDetector,
    batch_size: int = 8,
    chips: ChipWriter | None = None,
) -> pl.DataFrame:
    """Detects faces on the frames flagged ``sampled`` in the frames table, in a pass of its own over the video.

    The reader's ``max_side`` sets the detection resolution: frames are scaled
    while decoding and results are mapped back to original pixels.

    Args:
        chips: Where every detection's aligned chip goes, cut from the same decoded
            frame at full resolution (the reader must keep it: ``keep_full``), so
            the crops need no other pass over the video.

    Returns:
        The detections table (:data:`DETECTIONS_SCHEMA`), ordered by frame.
    """
    sampled = frames.filter(pl.col("sampled"))
    wanted = set(sampled["frame"].to_list())
    shot_of = dict(zip(sampled["frame"].to_list(), sampled["shot_id"].to_list()))
    time_of = dict(zip(sampled["frame"].to_list(), sampled["time_s"].to_list()))
    source = (
        (frame, shot_of[frame.index], time_of[frame.index])
        for frame in reader.frames(want=wanted.__contains__)
        if frame.image is not None
    )
    return detect_faces(source, reader, detector, batch_size, chips)


def detect_faces(
    frames: Iterable[tuple[DecodedFrame, int, float]],
    reader: VideoReader,
    detector: FaceDetector,
    batch_size: int = 8,
    chips: ChipWriter | None = None,
) -> pl.DataFrame:
    """Detects faces on ``frames``: (frame decoded by ``reader``, its shot id, its time in seconds), in order.

    See :func:`detect_video_faces`; this takes the frames from any pass, e.g. the one that
    also finds the shots (:class:`vcn.media.scan.MovieScan`).
    """
    if chips is not None and not reader.keep_full:
        raise ValueError("cutting chips needs the full-resolution frames: open the reader with keep_full=True")
    scale = reader.scale
    columns: dict[str, list] = {name: [] for name in DETECTIONS_SCHEMA}
    next_id = 0
    for batch in _batches(frames, batch_size):
        results = detector.detect([f.image for f, _, _ in batch])
        for (frame, shot, time_s), found in zip(batch, results):
            for i in range(len(found)):
                thumb = appearance_thumbnail(frame.image, found.boxes[i])
                columns["appearance"].append(_quantise(thumb))
            original = found.scaled(scale) if scale != 1.0 else found
            _append(columns, original, frame.index, shot, time_s, next_id)
            if chips is not None and len(found):
                # The landmarks as the table keeps them (float32), as the crops would read them back.
                points = np.asarray(original.landmarks, dtype=np.float32).reshape(-1, 5, 2)
                chips.add(frame.full, np.arange(next_id, next_id + len(found)), points)
            next_id += len(found)
    return pl.DataFrame(columns, schema=DETECTIONS_SCHEMA)


def appearance_matrix(detections: pl.DataFrame) -> np.ndarray:
    """(N, 256) float32 appearance vectors back from the ``appearance`` column."""
    if detections.is_empty():
        return np.zeros((0, THUMB_SIDE * THUMB_SIDE), np.float32)
    raw = np.frombuffer(b"".join(detections["appearance"].to_list()), dtype=np.int8)
    return raw.reshape(detections.height, -1).astype(np.float32) / 127.0


def _quantise(vector: np.ndarray) -> bytes:
    return np.clip(np.round(vector * 127.0), -127, 127).astype(np.int8).tobytes()


def _batches(frames: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _append(columns: dict[str, list], found: Detections, frame: int, shot: int, time_s: float, first_id: int) -> None:
    n = len(found)
    columns["detection_id"].extend(range(first_id, first_id + n))
    columns["frame"].extend([frame] * n)
    columns["shot_id"].extend([shot] * n)
    columns["time_s"].extend([time_s] * n)
    for j, name in enumerate(("x1", "y1", "x2", "y2")):
        columns[name].extend(found.boxes[:, j].tolist())
    columns["score"].extend(found.scores.tolist())
    flat = found.landmarks.reshape(n, 10)
    for j, name in enumerate(LANDMARK_COLUMNS):
        columns[name].extend(flat[:, j].tolist())
