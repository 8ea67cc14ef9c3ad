"""Shot (scene-cut) detection with PySceneDetect, fed by our own decoder.

PySceneDetect's detectors are driven frame by frame from :class:`VideoReader`
so that shot boundaries use exactly the frame numbering of every other stage,
also for variable-frame-rate files where frame numbers derived from timestamps
would drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import polars as pl

from vcn.media import VideoReader

#: Schema of the ``shots`` table: one row per shot, frames inclusive.
SHOTS_SCHEMA = {
    "shot_id": pl.Int32,
    "start_frame": pl.Int64,
    "end_frame": pl.Int64,
    "start_s": pl.Float64,
    "end_s": pl.Float64,
}


@dataclass(frozen=True)
class ShotConfig:
    """Settings of the shot detector.

    Attributes:
        detector: ``"content"`` (PySceneDetect's ContentDetector: a fixed threshold
            on the HSV change between frames) or ``"adaptive"`` (AdaptiveDetector:
            a change must stand out from its rolling neighbourhood). Content is the
            default: on our test footage adaptive also cut on a hand sweeping
            across the frame, content found exactly the hard cuts.
        threshold: For ``content``, the HSV-change threshold (PySceneDetect's
            default 27); for ``adaptive``, the adaptive ratio (default 3).
        min_shot_s: Shortest shot in seconds; closer cuts are merged (flash frames).
        analysis_side: Frames are downscaled to this longer side before analysis;
            cut detection does not need detail and this keeps the pass cheap.
    """

    detector: Literal["content", "adaptive"] = "content"
    threshold: float | None = None
    min_shot_s: float = 0.4
    analysis_side: int = 256


@dataclass(frozen=True)
class ShotScan:
    """What one decoding pass for shots gives.

    Attributes:
        shots: The shots table (:data:`SHOTS_SCHEMA`).
        frame_times: Every decoded frame's number, timestamp, time and key-frame flag
            (:data:`vcn.media.frames.FRAME_TIMES_SCHEMA`): the frame index without its shots,
            so that building it needs no second pass.
    """

    shots: pl.DataFrame
    frame_times: pl.DataFrame


def detect_shots(reader: VideoReader, config: ShotConfig = ShotConfig()) -> pl.DataFrame:
    """Runs one decoding pass and returns the shots table (:data:`SHOTS_SCHEMA`); see :func:`scan_shots`."""
    return scan_shots(reader, config).shots


def scan_shots(reader: VideoReader, config: ShotConfig = ShotConfig()) -> ShotScan:
    """Runs one decoding pass and returns the shots table and every frame's timing.

    The shots tile the whole video: the first starts at frame 0 and the last ends at
    the last decoded frame. ``reader.report`` is the pass's decode report afterwards.
    """
    from vcn.media.frames import FrameTimes

    cutter = ShotCutter(config, reader.info.fps or 25.0)
    analysis = VideoReader(
        reader.path, max_side=config.analysis_side, threads=reader.threads, info=reader.info, workers=reader.workers,
        progress=reader.progress,
    )
    timing = FrameTimes()
    for frame in analysis.frames():
        cutter.add(frame.index, frame.image)
        timing.add(frame)
    cutter.finish()
    reader.report = analysis.report
    frame_times = timing.table()
    return ShotScan(shots_from_cuts(cutter.cuts, frame_times["time_s"].to_numpy()), frame_times)


class ShotCutter:
    """PySceneDetect's detector fed frame by frame: the cuts so far, each the first frame of a new shot.

    A cut comes out up to :attr:`lookback` frames after the frame it falls on (the content
    detector waits out ``min_shot_s`` before it calls a cut it might still merge with a flash);
    :attr:`cuts` grows as it does. With ``keep_scores`` the content detector's score of each frame
    against the one before is kept (:attr:`scores`, from the second frame fed on), which is all
    :class:`ScoreCutter` needs to find the same cuts again.
    """

    def __init__(self, config: ShotConfig, fps: float, keep_scores: bool = False) -> None:
        from scenedetect import AdaptiveDetector, ContentDetector

        self.fps = fps
        #: Shortest shot in frames.
        self.min_len = max(1, int(round(config.min_shot_s * fps)))
        self.threshold = config.threshold
        if config.detector == "adaptive":
            self._detector = AdaptiveDetector(
                adaptive_threshold=config.threshold if config.threshold is not None else 3.0,
                min_scene_len=self.min_len,
            )
        elif config.detector == "content":
            self.threshold = config.threshold if config.threshold is not None else 27.0
            self._detector = ContentDetector(threshold=self.threshold, min_scene_len=self.min_len)
        else:
            raise ValueError(f"unknown shot detector {config.detector!r}; known: adaptive, content")
        self.scores: list[float] = []
        if keep_scores:
            if config.detector != "content":
                raise ValueError("frame scores are kept for the content detector only")
            self._detector.stats_manager = _ScoreSink(self.scores)
        self.cuts: list[int] = []
        self._last = None

    @property
    def lookback(self) -> int:
        """The most frames by which a cut can come out after the frame it falls on (the detector's own bound)."""
        return int(self._detector.event_buffer_length)

    def add(self, index: int, rgb: np.ndarray) -> list[int]:
        """Feeds frame ``index`` (RGB at the analysis size); returns the cuts it brought out."""
        from scenedetect import FrameTimecode

        self._last = FrameTimecode(index, fps=self.fps)
        found = [tc.frame_num for tc in self._detector.process_frame(self._last, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))]
        self.cuts.extend(found)
        return found

    def finish(self) -> list[int]:
        """Ends the stream; returns the cuts still held back."""
        if self._last is None:
            return []
        found = [tc.frame_num for tc in self._detector.post_process(self._last)]
        self.cuts.extend(found)
        return found


class _ScoreSink:
    """Takes the content detector's metrics of each frame (it reports them to a stats manager) and keeps the score."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def set_metrics(self, timecode, metrics: dict) -> None:
        from scenedetect import ContentDetector

        self.scores.append(float(metrics[ContentDetector.FRAME_SCORE_KEY]))


def frame_score(before: np.ndarray, after: np.ndarray) -> float:
    """The content detector's score of frame ``after`` against ``before`` (RGB at the analysis size)."""
    cutter = ShotCutter(ShotConfig(), 25.0, keep_scores=True)
    cutter.add(0, before)
    cutter.add(1, after)
    return cutter.scores[0]


class ScoreCutter:
    """The content detector's cuts from its frame scores: what :class:`ShotCutter` calls when fed the frames.

    The score of a frame against the one before depends on those two frames alone, so scores
    computed apart (by the worker processes that decode the movie's segments) give, in order,
    the cuts of one detector over the whole movie: only the cut decision, with its flash filter,
    runs here.
    """

    def __init__(self, config: ShotConfig, fps: float) -> None:
        from scenedetect.detector import FlashFilter

        reference = ShotCutter(config, fps)
        if config.detector != "content":
            raise ValueError("only the content detector's cuts can be found from its scores")
        self.fps = fps
        self.threshold = reference.threshold
        self.lookback = reference.lookback
        self._filter = FlashFilter(mode=FlashFilter.Mode.MERGE, length=reference.min_len)
        self.cuts: list[int] = []

    def add(self, index: int, score: float) -> list[int]:
        """Frame ``index``'s score against the frame before (0 for the first frame); returns the cuts it brought out."""
        from scenedetect import FrameTimecode

        found = [tc.frame_num for tc in self._filter.filter(FrameTimecode(index, fps=self.fps), score >= self.threshold)]
        self.cuts.extend(found)
        return found


def shots_from_cuts(cuts: list[int], frame_times: np.ndarray) -> pl.DataFrame:
    """Turns cut positions (first frame of each new shot) into the shots table."""
    n = len(frame_times)
    starts = sorted({c for c in cuts if 0 < c < n})
    bounds = [0, *starts, n]
    rows = {
        "shot_id": list(range(len(bounds) - 1)),
        "start_frame": bounds[:-1],
        "end_frame": [b - 1 for b in bounds[1:]],
    }
    rows["start_s"] = [float(frame_times[s]) for s in rows["start_frame"]] if n else []
    rows["end_s"] = [float(frame_times[e]) for e in rows["end_frame"]] if n else []
    return pl.DataFrame(rows, schema=SHOTS_SCHEMA)
