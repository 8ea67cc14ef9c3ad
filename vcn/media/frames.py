"""The frame index: every decoded frame, its time, its shot, and whether faces are detected on it."""

from __future__ import annotations

from array import array

import numpy as np
import polars as pl

from vcn.media import DecodedFrame, VideoReader

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


#: Schema of a pass's frame timing: the ``frames`` table without its shots.
FRAME_TIMES_SCHEMA = {name: FRAMES_SCHEMA[name] for name in ("frame", "pts", "time_s", "key_frame")}


class FrameTimes:
    """Collects the timing of the frames of one decoding pass, in order (pts -1 where a frame has none)."""

    def __init__(self) -> None:
        # Typed arrays: a feature film has ~200,000 frames, which as Python numbers would cost ~15 MB
        # of small objects, interleaved on the heap with the pass's other allocations.
        self.pts = array("q")
        self.times = array("d")
        self.keys = array("b")

    def add(self, frame: DecodedFrame) -> None:
        self.pts.append(-1 if frame.pts is None else int(frame.pts))
        self.times.append(frame.time_s)
        self.keys.append(frame.key_frame)

    def table(self) -> pl.DataFrame:
        """The frames so far (:data:`FRAME_TIMES_SCHEMA`)."""
        return pl.DataFrame(
            {
                "frame": np.arange(len(self.times), dtype=np.int64),
                "pts": np.frombuffer(self.pts, dtype=np.int64).copy(),
                "time_s": np.frombuffer(self.times, dtype=np.float64).copy(),
                "key_frame": np.frombuffer(self.keys, dtype=np.int8).astype(bool),
            },
            schema=FRAME_TIMES_SCHEMA,
        )


def read_frame_times(reader: VideoReader) -> pl.DataFrame:
    """Decodes every frame once (no colour conversion) and returns their timing (:data:`FRAME_TIMES_SCHEMA`).

    The shots pass gives the same table as it goes (:func:`vcn.media.shots.scan_shots`); this is for a
    movie whose shots came without it.
    """
    timing = FrameTimes()
    for frame in reader.frames(want=lambda _: False):
        timing.add(frame)
    return timing.table()


def build_frame_index(frame_times: pl.DataFrame, shots: pl.DataFrame, stride: int) -> pl.DataFrame:
    """The frames table (:data:`FRAMES_SCHEMA`) from a pass's frame timing and the shots.

    Frames past the shots table's last frame (a decoder that yields one more frame on
    another pass) join the last shot.
    """
    missing = sorted(set(FRAME_TIMES_SCHEMA) - set(frame_times.columns))
    if missing:
        raise ValueError(f"the frame timing lacks column(s) {', '.join(missing)}")
    shot_of_frame = shot_ids_for_frames(shots, frame_times.height)
    return frame_times.select(list(FRAME_TIMES_SCHEMA)).with_columns(
        pl.Series("shot_id", shot_of_frame.astype(np.int32), dtype=pl.Int32),
        pl.Series("sampled", sampled_mask(shot_of_frame, stride), dtype=pl.Boolean),
    ).cast(FRAMES_SCHEMA)


def shot_ids_for_frames(shots: pl.DataFrame, n_frames: int) -> np.ndarray:
    """The shot id of each of ``n_frames`` frames, from the shots table."""
    if shots.is_empty():
        return np.zeros(n_frames, dtype=np.int32)
    starts = shots["start_frame"].to_numpy()
    idx = np.searchsorted(starts, np.arange(n_frames), side="right") - 1
    return shots["shot_id"].to_numpy()[np.clip(idx, 0, len(starts) - 1)].astype(np.int32)
