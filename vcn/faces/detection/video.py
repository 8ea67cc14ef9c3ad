"""Running a face detector over the sampled frames of a video."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa

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
    return detect_faces(sampled_frames(reader, frames), reader, detector, batch_size, chips)


def sampled_frames(reader: VideoReader, frames: pl.DataFrame) -> Iterator[tuple[DecodedFrame, int, float]]:
    """(frame, shot id, time in seconds) of each frame flagged ``sampled`` in the frames table, decoded by ``reader``
    in a pass of its own: what :func:`detect_faces` takes."""
    sampled = frames.filter(pl.col("sampled"))
    wanted = set(sampled["frame"].to_list())
    shot_of = dict(zip(sampled["frame"].to_list(), sampled["shot_id"].to_list()))
    time_of = dict(zip(sampled["frame"].to_list(), sampled["time_s"].to_list()))
    for frame in reader.frames(want=wanted.__contains__):
        if frame.image is not None:
            yield frame, shot_of[frame.index], time_of[frame.index]


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
    parts = _Columns()
    next_id = 0
    for batch in _batches(frames, batch_size):
        results = detector.detect([f.image for f, _, _ in batch])
        for (frame, shot, time_s), found in zip(batch, results):
            n = len(found)
            if not n:
                continue
            thumbs = np.stack([appearance_thumbnail(frame.image, found.boxes[i]) for i in range(n)])
            original = found.scaled(scale) if scale != 1.0 else found
            parts.add(original, frame.index, shot, time_s, next_id, _quantise(thumbs))
            if chips is not None:
                # The landmarks as the table keeps them (float32), as the crops would read them back.
                points = np.asarray(original.landmarks, dtype=np.float32).reshape(-1, 5, 2)
                chips.add(frame.full, np.arange(next_id, next_id + n), points)
            next_id += n
    return parts.table()


class _Columns:
    """The detections table filled row by row into fixed-size numpy blocks, joined once at the end.

    A feature film has hundreds of thousands of detections: kept as Python floats and bytes, or as
    small numpy arrays per frame, they cost about a kilobyte each; here a detection costs its 344
    bytes of values (256 of them its appearance thumbnail).
    """

    BLOCK = 8192  # rows per block

    def __init__(self) -> None:
        self.blocks: list[dict[str, np.ndarray]] = []
        self.used = self.BLOCK  # rows of the last block in use

    def _new_block(self) -> None:
        self.blocks.append({
            "ids": np.empty(self.BLOCK, np.int64),
            "frames": np.empty(self.BLOCK, np.int64),
            "shots": np.empty(self.BLOCK, np.int32),
            "times": np.empty(self.BLOCK, np.float64),
            "values": np.empty((self.BLOCK, 15), np.float32),  # box (4), score, landmarks (10)
            "appearance": np.empty((self.BLOCK, THUMB_SIDE * THUMB_SIDE), np.int8),
        })
        self.used = 0

    def add(
        self, found: Detections, frame: int, shot: int, time_s: float, first_id: int, appearance: np.ndarray
    ) -> None:
        n, done = len(found), 0
        values = np.concatenate(
            [np.reshape(found.boxes, (n, 4)), np.reshape(found.scores, (n, 1)), np.reshape(found.landmarks, (n, 10))],
            axis=1,
        )
        while done < n:
            if self.used == self.BLOCK:
                self._new_block()
            block, at = self.blocks[-1], self.used
            take = min(n - done, self.BLOCK - at)
            rows = slice(at, at + take)
            block["ids"][rows] = np.arange(first_id + done, first_id + done + take)
            block["frames"][rows] = frame
            block["shots"][rows] = shot
            block["times"][rows] = time_s
            block["values"][rows] = values[done : done + take]
            block["appearance"][rows] = appearance[done : done + take]
            self.used += take
            done += take

    def table(self) -> pl.DataFrame:
        if not self.blocks:
            return pl.DataFrame(schema=DETECTIONS_SCHEMA)

        def joined(name: str) -> np.ndarray:
            parts = [block[name] for block in self.blocks[:-1]] + [self.blocks[-1][name][: self.used]]
            return np.concatenate(parts)

        values = joined("values")
        columns = {
            "detection_id": joined("ids"),
            "frame": joined("frames"),
            "shot_id": joined("shots"),
            "time_s": joined("times"),
            **{name: values[:, j] for j, name in enumerate(("x1", "y1", "x2", "y2", "score", *LANDMARK_COLUMNS))},
            "appearance": _binary_rows(joined("appearance")),
        }
        return pl.DataFrame(columns, schema=DETECTIONS_SCHEMA)


def _binary_rows(matrix: np.ndarray) -> pl.Series:
    """A Binary column whose row i holds the bytes of ``matrix[i]``, built without a Python object per row."""
    n, width = matrix.shape
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int64) * width).tobytes())
    data = pa.py_buffer(np.ascontiguousarray(matrix).tobytes())
    return pl.from_arrow(pa.Array.from_buffers(pa.large_binary(), n, [None, offsets, data]))


def appearance_matrix(detections: pl.DataFrame) -> np.ndarray:
    """(N, 256) float32 appearance vectors back from the ``appearance`` column."""
    if detections.is_empty():
        return np.zeros((0, THUMB_SIDE * THUMB_SIDE), np.float32)
    side = THUMB_SIDE * THUMB_SIDE
    raw = detections.get_column("appearance").bin.reinterpret(dtype=pl.Array(pl.Int8, side)).to_numpy()
    return raw.reshape(detections.height, side).astype(np.float32) / 127.0


def _quantise(vectors: np.ndarray) -> np.ndarray:
    """The appearance vectors as int8 (scale 127), the table's storage."""
    return np.clip(np.round(vectors * 127.0), -127, 127).astype(np.int8)


def _batches(frames: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
