"""One decoding pass that finds the shots, records the frame index and hands on the frames sampled for detection.

Which frames get face detection depends on where their shot starts
(:func:`vcn.media.frames.sampled_mask`), and the shot detector calls a cut only
some frames after the frame it falls on: PySceneDetect's content detector waits
out the shortest shot length before it calls a cut it might still merge with a
flash (the detector's ``event_buffer_length`` bounds the wait). So the pass keeps
the last few decoded pictures unconverted, as many as that bound, and decides
about a frame once it leaves the window: by then every cut at or before it has
come out. Only the frames sampled for detection are converted, at the
detector's size and at full size, from the same decoded picture the shot
detector saw.

With several decoding processes (:mod:`vcn.media.parallel`) each worker runs the
pass over its own key-frame segment with a shot detector of its own, converts
the frames that detector samples, and sends back every frame's content score.
A frame's score depends on it and the frame before alone, so the scores are the
whole movie's but for each segment's first frame, which this process scores
from the two workers' boundary pictures; one cut decision over all the scores
(:class:`vcn.media.shots.ScoreCutter`) then gives the cuts of a single pass. A
worker cannot know where its segment's first shot started, so it converts all
of that shot's frames (up to :data:`HEAD_FRAMES`); after its first cut its own
detector samples what the single pass samples, but for a cut it merges or
calls differently near its segment's ends. A sampled frame its worker did not
convert is decoded again here (counted in :attr:`MovieScan.frames_decoded`).

Should a cut ever come for a frame that has already left the window, or a
segment fail to decode exactly, the pass stops with :class:`OnePassUnavailable`
and the caller goes back to separate passes; the tables the pass builds at the
end are checked against the frames it handed on.
"""

from __future__ import annotations

import heapq
import multiprocessing
import time
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import polars as pl

from vcn.media.decode import DecodedFrame, DecodeReport, VideoReader
from vcn.media.frames import FrameTimes, build_frame_index
from vcn.media.shots import ScoreCutter, ShotConfig, ShotCutter, ShotScan, frame_score, shots_from_cuts

#: A worker converts every frame of its segment's first shot, up to this many frames: it cannot know
#: where that shot starts (in an earlier segment), so not which of them are sampled.
HEAD_FRAMES = 240
#: A sampled frame that its worker did not convert is decoded again with up to this many frames after it.
REDECODE_FRAMES = 240


class OnePassUnavailable(RuntimeError):
    """The one pass cannot give what separate passes give; the caller should make those."""


class CutBehindWindow(OnePassUnavailable):
    """The shot detector called a cut on a frame that had already been handed on."""

    def __init__(self, cut: int, released: int) -> None:
        super().__init__(f"the shot detector called a cut at frame {cut} after frame {released} was handed on")
        self.cut = cut
        self.released = released


class MovieScan:
    """The shots, the frame index and the frames sampled for detection, from one pass over the video.

    Args:
        reader: Decodes the video; the frames handed on have its sizes: ``image`` at its
            ``max_side`` and, with ``keep_full``, ``full``. With ``workers`` above 1 its worker
            processes decode key-frame segments (the content detector only; the adaptive one
            raises :class:`OnePassUnavailable` there).
        shots: The shot detector's settings.
        stride: Every ``stride``-th frame of a shot, from its first, is sampled for detection.

    After :meth:`sampled_frames` is exhausted, :attr:`shot_scan` and :attr:`frames` hold what
    :func:`vcn.media.shots.scan_shots` and :func:`vcn.media.frames.build_frame_index` give,
    :attr:`frames_decoded` the frames decoded in all, and :attr:`seconds` the time the pass itself
    took (decoding, shot detection, the frame index), not what was done with the frames it handed on.
    """

    def __init__(self, reader: VideoReader, shots: ShotConfig, stride: int) -> None:
        self.reader = reader
        self.config = shots
        self.stride = stride
        self.shot_scan: ShotScan | None = None
        self.frames: pl.DataFrame | None = None
        self.frames_decoded = 0
        self.seconds = 0.0

    def sampled_frames(self) -> Iterator[tuple[DecodedFrame, int]]:
        """Yields (frame, shot id) for each frame sampled for detection, in order, as the pass goes.

        Raises:
            OnePassUnavailable: A cut came too late for the frames already handed on, or a segment
                could not be decoded exactly, or the adaptive detector with worker processes.
            EmptyVideoError, CorruptVideoError: As :meth:`VideoReader.frames`.
        """
        started = time.perf_counter()
        plan = None
        if self.reader.workers > 1:
            from vcn.media.parallel import plan_segments

            plan = plan_segments(self.reader.path)
        if plan is not None and len(plan.starts) > 1:
            if self.config.detector != "content":
                raise OnePassUnavailable(f"the {self.config.detector} shot detector runs in one process only")
            frames = self._parallel(plan)
        else:
            frames = self._one_process()
        self.seconds += time.perf_counter() - started
        while True:
            started = time.perf_counter()
            try:
                item = next(frames)
            except StopIteration:
                self.seconds += time.perf_counter() - started
                return
            self.seconds += time.perf_counter() - started
            yield item

    def _one_process(self) -> Iterator[tuple[DecodedFrame, int]]:
        reader = self.reader
        cutter = ShotCutter(self.config, reader.info.fps or 25.0)
        analysis = VideoReader(reader.path, max_side=self.config.analysis_side, info=reader.info)
        timing = FrameTimes()
        window = _Window(self.stride, cutter.lookback)
        declared = reader.info.frame_count
        for frame, picture in reader.pictures():
            timing.add(frame)
            window.take(cutter.add(frame.index, analysis.convert(picture, frame.index)[0]))
            for kept, held, shot, sampled in window.push(frame, picture):
                if sampled:
                    image, full = reader.convert(held, kept.index)
                    yield _with_images(kept, image, full), shot
            if reader.progress is not None:
                reader.progress(frame.index + 1, declared)
        window.take(cutter.finish())
        for kept, held, shot, sampled in window.flush():
            if sampled:
                image, full = reader.convert(held, kept.index)
                yield _with_images(kept, image, full), shot
        self.frames_decoded = reader.report.frames
        self._finish(timing, cutter.cuts, window)

    def _parallel(self, plan) -> Iterator[tuple[DecodedFrame, int]]:
        from vcn.media.parallel import decode_segment

        reader = self.reader
        fps = reader.info.fps or 25.0
        cutter = ScoreCutter(self.config, fps)
        timing = FrameTimes()
        window = _Window(self.stride, cutter.lookback)
        declared = reader.info.frame_count
        redecoded: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        extra = 0
        first_time: float | None = None
        previous_last: np.ndarray | None = None

        def images(index: int, segment: int, converted: dict) -> tuple[np.ndarray, np.ndarray | None]:
            """A sampled frame's images: its worker's, or decoded again with the rest of its segment's frames."""
            nonlocal extra
            local = index - plan.starts[segment]
            if local in converted:
                return converted.pop(local)
            if index not in redecoded:
                first, end = plan.segment(segment)
                upto = min(end, index + REDECODE_FRAMES)
                wanted = np.zeros(upto - first, dtype=bool)
                wanted[local:] = True
                result = decode_segment(
                    reader.path, reader.max_side, max(1, reader.threads or 2), reader.info, plan.pts[first:upto], wanted,
                    reader.keep_full,
                )
                if result.failure is not None:
                    raise OnePassUnavailable(f"segment from frame {first} could not be decoded again: {result.failure}")
                extra += upto - first
                for offset in range(local, upto - first):
                    redecoded[first + offset] = result.frames[offset][3:5]
            return redecoded.pop(index)

        held_by: dict[int, tuple[int, dict]] = {}  # frame -> (segment, that segment's converted frames)
        for segment, result in enumerate(_scanned_segments(reader, plan, self.config, self.stride)):
            first, _ = plan.segment(segment)
            scores = result.scores
            scores[0] = 0.0 if previous_last is None else frame_score(previous_last, result.first_analysis)
            previous_last = result.last_analysis
            for offset, (pts, t, key) in enumerate(result.frames):
                index = first + offset
                if first_time is None:
                    first_time = t
                frame = DecodedFrame(index=index, pts=pts, time_s=float(t - first_time), key_frame=key, image=None)
                timing.add(frame)
                window.take(cutter.add(index, float(scores[offset])))
                held_by[index] = (segment, result.converted)
                for kept, _, shot, sampled in window.push(frame, None):
                    where = held_by.pop(kept.index)
                    if sampled:
                        yield _with_images(kept, *images(kept.index, *where)), shot
                if reader.progress is not None:
                    reader.progress(index + 1, declared)
        for kept, _, shot, sampled in window.flush():
            where = held_by.pop(kept.index)
            if sampled:
                yield _with_images(kept, *images(kept.index, *where)), shot
        reader.report = DecodeReport(
            frames=len(plan.pts), packets=plan.packets, declared_frames=reader.info.frame_count, finished=True
        )
        reader._report_truncation(reader.report)
        self.frames_decoded = len(plan.pts) + extra
        self._finish(timing, cutter.cuts, window)

    def _finish(self, timing: FrameTimes, cuts: list[int], window: _Window) -> None:
        frame_times = timing.table()
        self.shot_scan = ShotScan(shots_from_cuts(cuts, frame_times["time_s"].to_numpy()), frame_times)
        self.frames = build_frame_index(frame_times, self.shot_scan.shots, self.stride)
        if not (
            np.array_equal(self.frames["shot_id"].to_numpy(), np.frombuffer(window.shot_ids, dtype=np.int32))
            and np.array_equal(self.frames["sampled"].to_numpy(), np.frombuffer(window.sampled, dtype=np.int8).astype(bool))
        ):
            raise OnePassUnavailable("the frames handed on do not match the shots found")  # a bug if ever seen


def _with_images(frame: DecodedFrame, image: np.ndarray, full: np.ndarray | None) -> DecodedFrame:
    return DecodedFrame(
        index=frame.index, pts=frame.pts, time_s=frame.time_s, key_frame=frame.key_frame, image=image, full=full
    )


class _Window:
    """The frames not yet handed on, and the cuts, as they come: a frame leaves once no cut can still fall on or
    before it (``lookback`` frames later), with its shot and whether it is sampled."""

    def __init__(self, stride: int, lookback: int) -> None:
        self.stride = stride
        self.lookback = lookback
        self.pending: deque = deque()
        self.upcoming: list[int] = []  # cuts the frames handed on have not reached (a heap)
        self.known: set[int] = set()
        self.released = -1
        self.shot_start = 0
        self.shot_id = 0
        self.shot_ids = array("i")  # of each frame handed on
        self.sampled = array("b")

    def take(self, cuts: list[int]) -> None:
        """Cuts the detector called.

        Raises:
            CutBehindWindow: One falls on a frame already handed on.
        """
        for cut in cuts:
            if cut <= 0 or cut in self.known:
                continue
            if cut <= self.released:
                raise CutBehindWindow(cut, self.released)
            self.known.add(cut)
            heapq.heappush(self.upcoming, cut)

    def push(self, frame: DecodedFrame, picture: Any) -> Iterator[tuple[DecodedFrame, Any, int, bool]]:
        """Adds the newest frame; yields (frame, picture, shot id, sampled) of each frame that leaves."""
        self.pending.append((frame, picture))
        while self.pending[0][0].index <= frame.index - self.lookback:
            yield self._leave(*self.pending.popleft())

    def flush(self) -> Iterator[tuple[DecodedFrame, Any, int, bool]]:
        """At the end of the stream (its last cuts taken): every frame left."""
        while self.pending:
            yield self._leave(*self.pending.popleft())

    def _leave(self, frame: DecodedFrame, picture: Any) -> tuple[DecodedFrame, Any, int, bool]:
        while self.upcoming and self.upcoming[0] <= frame.index:
            self.shot_start = heapq.heappop(self.upcoming)
            self.shot_id += 1
        self.released = frame.index
        sampled = (frame.index - self.shot_start) % self.stride == 0
        self.shot_ids.append(self.shot_id)
        self.sampled.append(sampled)
        return frame, picture, self.shot_id, sampled


@dataclass
class SegmentScan:
    """What a worker's pass over one segment gives.

    Attributes:
        frames: (pts, time, key frame) of each frame.
        scores: The content detector's score of each frame against the one before; the first is
            unknown here (the frame before is another segment's) and left 0.
        first_analysis, last_analysis: The first and last frames at the analysis size (RGB).
        converted: (image, full) of the frames the worker's own shot detector sampled, and of every
            frame of the segment's first shot (up to :data:`HEAD_FRAMES`), by offset.
        failure: Why the segment could not be scanned exactly, or None.
    """

    frames: list[tuple[int, float, bool]] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_analysis: np.ndarray | None = None
    last_analysis: np.ndarray | None = None
    converted: dict[int, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    failure: str | None = None


def scan_segment(
    path: str, max_side: int | None, threads: int, info, pts: np.ndarray, first: int, shots: ShotConfig, stride: int,
    keep_full: bool, head_frames: int,
) -> SegmentScan:
    """The pass over the frames with timestamps ``pts`` (sorted; frame numbers from ``first``), in a worker process;
    it converts the frames its shot detector samples and up to ``head_frames`` frames of the first shot."""
    from vcn.media.parallel import SegmentError, segment_pictures

    reader = VideoReader(path, max_side=max_side, threads=threads, info=info, keep_full=keep_full)
    analysis = VideoReader(path, max_side=shots.analysis_side, info=info)
    cutter = ShotCutter(shots, info.fps or 25.0, keep_scores=True)
    window = _Window(stride, cutter.lookback)
    out = SegmentScan()

    def keep(left) -> None:
        for kept, picture, shot, sampled in left:
            # Before the first cut this worker finds, the frame's shot started in an earlier segment.
            if sampled or (shot == 0 and kept.index - first < head_frames):
                out.converted[kept.index - first] = reader.convert(picture, kept.index)

    try:
        for i, picture in segment_pictures(path, threads, pts):
            if i != len(out.frames):
                return SegmentScan(failure=f"frame at pts {picture.pts} came out of order")
            out.frames.append((int(picture.pts), float(picture.time), bool(picture.key_frame)))
            rgb = analysis.convert(picture, first + i)[0]
            if i == 0:
                out.first_analysis = rgb
            out.last_analysis = rgb
            window.take(cutter.add(first + i, rgb))
            frame = DecodedFrame(index=first + i, pts=None, time_s=0.0, key_frame=False, image=None)
            keep(window.push(frame, picture))
    except (SegmentError, CutBehindWindow) as exc:
        return SegmentScan(failure=str(exc))
    keep(window.flush())
    out.scores = np.asarray([0.0, *cutter.scores], dtype=np.float64)
    return out


def _scanned_segments(reader: VideoReader, plan, shots: ShotConfig, stride: int) -> Iterator[SegmentScan]:
    """Each segment's :class:`SegmentScan` in order, scanned by ``reader.workers`` processes, a few in flight."""
    threads = max(1, reader.threads or 2)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=reader.workers, mp_context=context) as pool:
        pending = []
        next_segment = 0

        def submit() -> None:
            nonlocal next_segment
            first, end = plan.segment(next_segment)
            pending.append(
                pool.submit(scan_segment, reader.path, reader.max_side, threads, reader.info, plan.pts[first:end], first,
                            shots, stride, reader.keep_full, HEAD_FRAMES)
            )
            next_segment += 1

        while next_segment < len(plan.starts) and len(pending) < reader.workers + 1:
            submit()
        segment = 0
        while pending:
            result = pending.pop(0).result()
            if result.failure is not None:
                for future in pending:
                    future.cancel()
                raise OnePassUnavailable(f"segment from frame {plan.segment(segment)[0]}: {result.failure}")
            yield result
            segment += 1
            if next_segment < len(plan.starts):
                submit()
