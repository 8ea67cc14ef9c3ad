"""The frame index: every decoded frame, its time, its shot, and whether faces are detected on it."""

from __future__ import annotations

import numpy as np
import polars as pl

from vcn.media import VideoReader

#: Schema of the ``frames`` table: one row per decoded frame.
FRAMES_SCHEMA = {
    "frame": pl.Int64,
    "pts": pl.Int64,
    "time_s": pl.Float64,
    "key_frame": pl.Boolean,
    "shot_id": pl.Int32,
    "sampled": pl.Boolean,
}

#: Faces are detected at about this many frames per second of video. Faces move
#: little in an eighth of a second, so tracks stay linkable, and detection, the
#: costliest stage on a CPU, runs on a third of a 24 fps movie's frames.
DEFAULT_DETECT_FPS = 8.0


def sample_stride(fps: float, detect_fps: float = DEFAULT_DETECT_FPS) -> int:
    """Frames between two detection samples for a video at ``fps``."""
    if detect_fps <= 0:
        raise ValueError(f"detect_fps must be positive, got {detect_fps}")
    return max(1, int(round((fps or detect_fps) / detect_fps)))


def sampled_mask(shot_of_frame: np.ndarray, stride: int) -> np.ndarray:
    """Which frames get detection: every ``stride``-th frame counted from each shot's first."""
    n = len(shot_of_frame)
    if n == 0:
        return np.zeros(0, dtype=bool)
    starts = np.r_[True, shot_of_frame[1:] != shot_of_frame[:-1]]
    shot_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return (np.arange(n) - shot_start) % stride == 0


def build_frame_index(reader: VideoReader, shots: pl.DataFrame, stride: int) -> pl.DataFrame:
    """Decodes every frame once (no colour conversion) and returns the frames table.

    Frames decoded past the shots table's last frame (a decoder that yields one
    more frame on a second pass) join the last shot.
    """
    pts: list[int] = []
    times: list[float] = []
    keys: list[bool] = []
    for frame in reader.frames(want=lambda _: False):
        pts.append(-1 if frame.pts is None else int(frame.pts))
        times.append(frame.time_s)
        keys.append(frame.key_frame)
    n = len(times)
    shot_of_frame = shot_ids_for_frames(shots, n)
    return pl.DataFrame(
        {
            "frame": np.arange(n, dtype=np.int64),
            "pts": np.asarray(pts, dtype=np.int64),
            "time_s": np.asarray(times, dtype=np.float64),
            "key_frame": np.asarray(keys, dtype=bool),
            "shot_id": shot_of_frame.astype(np.int32),
            "sampled": sampled_mask(shot_of_frame, stride),
        },
        schema=FRAMES_SCHEMA,
    )


def shot_ids_for_frames(shots: pl.DataFrame, n_frames: int) -> np.ndarray:
    """The shot id of each of ``n_frames`` frames, from the shots table."""
    if shots.is_empty():
        return np.zeros(n_frames, dtype=np.int32)
    starts = shots["start_frame"].to_numpy()
    idx = np.searchsorted(starts, np.arange(n_frames), side="right") - 1
    return shots["shot_id"].to_numpy()[np.clip(idx, 0, len(starts) - 1)].astype(np.int32)
