"""One decoding pass that finds the shots, records the frame index and hands on the frames sampled for detection.

Which frames get face detection depends on where their shot starts
(:func:`vcn.media.frames.sampled_mask`), and the shot detector calls a cut only
some frames after the frame it falls on: PySceneDetect's content detector waits
out the shortest shot length before it calls a cut it might still merge with a
flash. So the pass keeps the last few decoded pictures unconverted, a window a
little longer than the shortest shot, and decides about a frame once it leaves
the window: by then every cut at or before it has come out. Only the frames
sampled for detection are converted, at the detector's size and at full size,
from the same decoded picture the shot detector saw.

Should a cut ever come for a frame that has already left the window, the pass
stops with :class:`CutBehindWindow` and the caller goes back to separate passes;
the tables it builds at the end are checked against the frames it handed on.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Iterator

import numpy as np
import polars as pl

from vcn.media.decode import DecodedFrame, VideoReader
from vcn.media.frames import FrameTimes, build_frame_index
from vcn.media.shots import ShotConfig, ShotCutter, ShotScan, shots_from_cuts

#: Frames the window holds beyond the shortest shot. The content detector calls a cut
#: either on its frame or exactly ``min_len`` frames later; the adaptive one two frames later.
WINDOW_MARGIN = 4


class CutBehindWindow(RuntimeError):
    """The shot detector called a cut on a frame that had already been handed on."""

    def __init__(self, cut: int, released: int) -> None:
        super().__init__(f"the shot detector called a cut at frame {cut} after frame {released} was handed on")
        self.cut = cut
        self.released = released


class MovieScan:
    """The shots, the frame index and the frames sampled for detection, from one pass over the video.

    Args:
        reader: Decodes the video (in this process, whatever its ``workers``); the frames handed
            on have its sizes: ``image`` at its ``max_side`` and, with ``keep_full``, ``full``.
        shots: The shot detector's settings.
        stride: Every ``stride``-th frame of a shot, from its first, is sampled for detection.

    After :meth:`sampled_frames` is exhausted, :attr:`shot_scan` and :attr:`frames` hold what
    :func:`vcn.media.shots.scan_shots` and :func:`vcn.media.frames.build_frame_index` give.
    """

    def __init__(self, reader: VideoReader, shots: ShotConfig, stride: int) -> None:
        self.reader = reader
        self.config = shots
        self.stride = stride
        self.shot_scan: ShotScan | None = None
        self.frames: pl.DataFrame | None = None

    def sampled_frames(self) -> Iterator[tuple[DecodedFrame, int]]:
        """Yields (frame, shot id) for each frame sampled for detection, in order, as the pass goes.

        Raises:
            CutBehindWindow: A cut came too late for the frames already handed on.
            EmptyVideoError, CorruptVideoError: As :meth:`VideoReader.frames`.
        """
        reader = self.reader
        cutter = ShotCutter(self.config, reader.info.fps or 25.0)
        analysis = VideoReader(reader.path, max_side=self.config.analysis_side, info=reader.info)
        window = cutter.min_len + WINDOW_MARGIN
        timing = FrameTimes()
        pending: deque = deque()
        upcoming: list[int] = []  # cuts not yet reached by the frames handed on (a heap)
        known: set[int] = set()
        state = _Release(self.stride)
        declared = reader.info.frame_count
        for frame, picture in reader.pictures():
            timing.add(frame)
            found = cutter.add(frame.index, analysis.convert(picture, frame.index)[0])
            self._take(found, known, upcoming, state.released)
            pending.append((frame, picture))
            while pending[0][0].index <= frame.index - window:
                yield from state.release(reader, *pending.popleft(), upcoming)
            if reader.progress is not None:
                reader.progress(frame.index + 1, declared)
        self._take(cutter.finish(), known, upcoming, state.released)
        while pending:
            yield from state.release(reader, *pending.popleft(), upcoming)

        frame_times = timing.table()
        self.shot_scan = ShotScan(shots_from_cuts(cutter.cuts, frame_times["time_s"].to_numpy()), frame_times)
        self.frames = build_frame_index(frame_times, self.shot_scan.shots, self.stride)
        if not (
            np.array_equal(self.frames["shot_id"].to_numpy(), np.asarray(state.shot_ids, dtype=np.int32))
            and np.array_equal(self.frames["sampled"].to_numpy(), np.asarray(state.sampled, dtype=bool))
        ):
            raise CutBehindWindow(-1, state.released)  # cannot happen while every cut came inside the window

    @staticmethod
    def _take(found: list[int], known: set[int], upcoming: list[int], released: int) -> None:
        for cut in found:
            if cut <= 0 or cut in known:
                continue
            if cut <= released:
                raise CutBehindWindow(cut, released)
            known.add(cut)
            heapq.heappush(upcoming, cut)


class _Release:
    """The frames handed on so far: the shot each is in and whether it was sampled."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.released = -1
        self.shot_start = 0
        self.shot_id = 0
        self.shot_ids: list[int] = []
        self.sampled: list[bool] = []

    def release(self, reader: VideoReader, frame: DecodedFrame, picture, upcoming: list[int]):
        while upcoming and upcoming[0] <= frame.index:
            self.shot_start = heapq.heappop(upcoming)
            self.shot_id += 1
        self.released = frame.index
        sampled = (frame.index - self.shot_start) % self.stride == 0
        self.shot_ids.append(self.shot_id)
        self.sampled.append(sampled)
        if sampled:
            image, full = reader.convert(picture, frame.index)
            yield DecodedFrame(
                index=frame.index, pts=frame.pts, time_s=frame.time_s, key_frame=frame.key_frame, image=image, full=full
            ), self.shot_id
