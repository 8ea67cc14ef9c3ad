"""Decoding one video in several processes at once, frames still in order and numbered as one pass numbers them.

A single decoder keeps a few cores busy; on a GPU machine with many cores the
decode of a feature film, and the RGB conversion of the frames that are kept,
become what the GPU waits for. Here the movie is cut at key frames into
segments of about :data:`SEGMENT_FRAMES` frames, worker processes decode the
segments (each seeks to its key frame), and the caller receives the frames in
presentation order, a few segments in flight at a time so memory stays bounded.

A frame's number is the one a single pass gives it: its rank among the stream's
packet timestamps, read first by demuxing the file without decoding (seconds
for a feature film). Segments split by timestamp: a segment owns the frames
whose timestamps fall between its key frame and the next segment's, so the
leading frames of an open group of pictures, which follow the next key frame in
decode order, are decoded by the segment that holds their references.

Anything that breaks the single-pass numbering (packets without timestamps or
with repeated ones, packets that fail to decode, a segment that does not yield
exactly the frames its timestamps promise) makes :func:`plan_segments` return
None or the segment report a failure; the caller then decodes in one pass,
which numbers damaged streams the way the rest of the platform expects.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

#: Target frames per segment: ~40 s at 24 fps; the in-flight segments' kept RGB
#: frames are what this path holds in memory.
SEGMENT_FRAMES = 1000


def default_workers() -> int:
    """Decoding processes for this machine: ``VCN_DECODE_WORKERS`` if set, else one per 4 cores (at most 4)
    on machines of 8 cores or more, and 1 (one pass, in the caller's process) below.

    Raises:
        ValueError: ``VCN_DECODE_WORKERS`` is not a positive integer.
    """
    value = os.environ.get("VCN_DECODE_WORKERS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"VCN_DECODE_WORKERS must be a positive integer, got {value!r}")
        return int(value)
    cores = os.cpu_count() or 1
    return 1 if cores < 8 else min(4, cores // 4)


@dataclass(frozen=True)
class SegmentPlan:
    """The stream's frame timestamps in presentation order and where segments start.

    Attributes:
        pts: (F,) sorted presentation timestamps, one per frame; a frame's number is its position.
        starts: Frame numbers at which segments start (key frames), first 0.
        packets: Video packets in the stream.
    """

    pts: np.ndarray
    starts: list[int]
    packets: int

    def segment(self, k: int) -> tuple[int, int]:
        """Frame numbers [first, end) of segment ``k``."""
        end = self.starts[k + 1] if k + 1 < len(self.starts) else len(self.pts)
        return self.starts[k], end


def plan_segments(path: str, segment_frames: int | None = None) -> SegmentPlan | None:
    """Demuxes the video stream (no decoding) and cuts it into segments at key frames.

    Args:
        path: The video.
        segment_frames: Least frames per segment (default :data:`SEGMENT_FRAMES`).

    Returns:
        The plan, or None when the stream cannot be numbered from its packets
        (a packet without a timestamp, a repeated timestamp, a demuxing error).
    """
    import av

    pts: list[int] = []
    keys: list[int] = []
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream flush packet
                    continue
                if packet.pts is None:
                    return None
                pts.append(int(packet.pts))
                if packet.is_keyframe:
                    keys.append(int(packet.pts))
    except av.error.FFmpegError as exc:
        log.info("%s: no segment plan (%s); decoding in one pass", path, exc)
        return None
    ordered = np.sort(np.array(pts, dtype=np.int64))
    if len(ordered) == 0 or (np.diff(ordered) == 0).any() or not keys:
        return None
    key_ranks = np.searchsorted(ordered, np.array(sorted(set(keys)), dtype=np.int64))
    if key_ranks[0] != 0:
        return None  # frames before the first key frame cannot be decoded after a seek
    segment_frames = segment_frames or SEGMENT_FRAMES
    starts = [0]
    for rank in key_ranks[1:].tolist():
        if rank - starts[-1] >= segment_frames:
            starts.append(rank)
    return SegmentPlan(pts=ordered, starts=starts, packets=len(pts))


@dataclass
class SegmentResult:
    """What a worker decoded: per frame (pts, time, key frame, RGB image or None, full-size RGB or None), or why
    it failed."""

    frames: list[tuple[int, float, bool, np.ndarray | None, np.ndarray | None]]
    failure: str | None = None


def decode_segment(
    path: str, max_side: int | None, threads: int, info, pts: np.ndarray, wanted: np.ndarray, keep_full: bool = False
) -> SegmentResult:
    """Decodes the frames with timestamps ``pts`` (sorted), converting those where ``wanted`` is true.

    Runs in a worker process: seeks to the key frame at ``pts[0]`` and decodes
    until every timestamp of the segment has come out.
    """
    from vcn.media.decode import VideoReader

    reader = VideoReader(path, max_side=max_side, threads=threads, info=info, keep_full=keep_full)
    out: list = [None] * len(pts)
    try:
        for i, frame in segment_pictures(path, threads, pts):
            image, full = reader.convert(frame, i) if wanted[i] else (None, None)
            out[i] = (int(frame.pts), float(frame.time), bool(frame.key_frame), image, full)
    except SegmentError as exc:
        return SegmentResult([], str(exc))
    return SegmentResult(out)


class SegmentError(Exception):
    """A segment's frames cannot be decoded as one pass numbers them; the message says why."""


def segment_pictures(path: str, threads: int, pts: np.ndarray) -> Iterator[tuple[int, Any]]:
    """(position in ``pts``, decoded picture) of each frame with a timestamp in ``pts`` (sorted), in decoder order.

    Seeks to the key frame at ``pts[0]`` and decodes until every timestamp has come out.

    Raises:
        SegmentError: A frame without a timestamp, one not among the stream's packets or decoded twice,
            a decoding error, or frames that never came.
    """
    import av

    first, last = int(pts[0]), int(pts[-1])
    position = {int(p): i for i, p in enumerate(pts.tolist())}
    seen = np.zeros(len(pts), dtype=bool)
    remaining = len(pts)
    try:
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if threads:
                stream.codec_context.thread_count = threads
            container.seek(first, stream=stream, backward=True, any_frame=False)
            for packet in container.demux(stream):
                for frame in packet.decode():
                    if frame.pts is None:
                        raise SegmentError("a decoded frame has no timestamp")
                    i = position.get(int(frame.pts))
                    if i is None:
                        if first <= frame.pts <= last:
                            raise SegmentError(f"frame at pts {frame.pts} is not among the stream's packets")
                        continue
                    if seen[i]:
                        raise SegmentError(f"frame at pts {frame.pts} decoded twice")
                    seen[i] = True
                    remaining -= 1
                    yield i, frame
                if remaining == 0:
                    break
    except av.error.FFmpegError as exc:
        raise SegmentError(f"decoding failed ({exc})") from exc
    if remaining:
        raise SegmentError(f"{remaining} of the segment's {len(pts)} frames did not decode")


def parallel_frames(
    reader, plan: SegmentPlan, want: Callable[[int], bool] | None, workers: int
) -> Iterator[tuple[int, int, float, bool, np.ndarray | None, np.ndarray | None]]:
    """(index, pts, time, key frame, image, full) of every frame in order, decoded by ``workers`` processes.

    Stops early (the caller goes on in one pass from the next frame) when a
    segment fails: the frames yielded so far are right, the rest are not given.

    Raises:
        SegmentFailed: After the last good frame, when a segment could not be decoded exactly.
    """
    n = len(plan.pts)
    wanted = np.fromiter((want is None or bool(want(i)) for i in range(n)), dtype=bool, count=n)
    threads = max(1, reader.threads or 2)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = []
        next_segment = 0

        def submit() -> None:
            nonlocal next_segment
            first, end = plan.segment(next_segment)
            pending.append(
                pool.submit(decode_segment, reader.path, reader.max_side, threads, reader.info,
                            plan.pts[first:end], wanted[first:end], reader.keep_full)
            )
            next_segment += 1

        while next_segment < len(plan.starts) and len(pending) < workers + 1:
            submit()
        segment = 0
        while pending:
            result = pending.pop(0).result()
            if result.failure is not None:
                for future in pending:
                    future.cancel()
                raise SegmentFailed(plan.segment(segment)[0], result.failure)
            first, _ = plan.segment(segment)
            for offset, (pts, time, key, image, full) in enumerate(result.frames):
                yield first + offset, pts, time, key, image, full
            segment += 1
            if next_segment < len(plan.starts):
                submit()


class SegmentFailed(Exception):
    """A segment could not be decoded exactly; frames from ``index`` on must come from one pass."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"segment from frame {index}: {reason}")
        self.index = index
        self.reason = reason
