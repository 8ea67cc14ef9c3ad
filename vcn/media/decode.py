"""Streaming frame decoding with PyAV.

Frames come out one at a time in presentation order and are numbered from 0 in
the order the decoder yields them; that number is the frame id everywhere in
the platform. Only the frames a caller asks for are converted to RGB arrays,
so a pass over a two-hour movie holds one frame in memory at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from vcn.errors import CorruptVideoError, EmptyVideoError
from vcn.media.probe import VideoInfo, flush_decoder, normalise_rotation, probe_video

log = logging.getLogger(__name__)

#: A stream in which more than this share of packets fail to decode is called corrupt
#: rather than damaged: the frames that remain would not represent the movie. Below
#: it the damaged stretches are skipped (a broken packet takes the frames that
#: reference it down with it, up to the next key frame) and reported as warnings.
MAX_BAD_PACKET_FRACTION = 0.5


@dataclass(frozen=True)
class DecodedFrame:
    """One frame as the platform sees it.

    Attributes:
        index: 0-based position in decoder output order.
        pts: Presentation timestamp in stream time-base units (None if the stream has none).
        time_s: Seconds since the first frame.
        key_frame: Whether the frame is a key frame.
        image: (H, W, 3) uint8 RGB, upright, possibly downscaled; None if not requested.
        full: The same frame at the video's own size, for a reader asked to keep it
            (``keep_full``; ``image`` itself where that is not downscaled); else None.
    """

    index: int
    pts: int | None
    time_s: float
    key_frame: bool
    image: np.ndarray | None
    full: np.ndarray | None = None


@dataclass
class DecodeReport:
    """What a full pass over the stream found; complete once iteration ends."""

    frames: int = 0
    bad_packets: int = 0
    packets: int = 0
    declared_frames: int = 0
    finished: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        """Fewer frames decoded than the container declares (a cut-off file)."""
        return self.declared_frames > 0 and self.frames < 0.98 * self.declared_frames


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) shrunk so the longer side is at most ``max_side``, even-sized."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


class VideoReader:
    """Decodes a video file frame by frame.

    Args:
        path: The video.
        max_side: If set, RGB images are downscaled (by libswscale, before
            conversion) so their longer displayed side is at most this.
        threads: Decoder threads; 0 lets FFmpeg choose.
        info: A previous :func:`probe_video` result, to skip probing again.
        workers: Processes decoding segments of the movie at once
            (:mod:`vcn.media.parallel`); 1 decodes in this process, in one pass.
            Frames, their numbers and timestamps are the same either way.
        progress: Called as ``progress(frames so far, frames the container declares)``
            after each frame (e.g. a :class:`vcn.progress.Meter`).
        keep_full: Also give each wanted frame at the video's own size (:attr:`DecodedFrame.full`),
            converted from the same decoded picture: one pass serves a stage that works on
            downscaled frames and one that cuts from full-resolution ones.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_side: int | None = None,
        threads: int = 0,
        info: VideoInfo | None = None,
        workers: int = 1,
        progress: Callable[[int, int], None] | None = None,
        keep_full: bool = False,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.workers = workers
        self.info = info or probe_video(path)
        self.path = str(path)
        self.max_side = max_side
        self.threads = threads
        self.progress = progress
        self.keep_full = keep_full
        self.report = DecodeReport(declared_frames=self.info.frame_count)
        self.out_width, self.out_height = scaled_size(self.info.width, self.info.height, max_side)

    @property
    def scale(self) -> float:
        """Factor from output-image pixels back to original displayed pixels."""
        return self.info.width / self.out_width

    def frames(self, want: Callable[[int], bool] | None = None) -> Iterator[DecodedFrame]:
        """Yields every frame; ``image`` is filled only where ``want(index)`` is true.

        Raises:
            EmptyVideoError: no frame could be decoded.
            CorruptVideoError: too many packets failed to decode, or a wanted frame
                cannot be converted to RGB.
        """
        if self.progress is None:
            yield from self._frames(want)
            return
        declared = self.info.frame_count
        for frame in self._frames(want):
            yield frame
            self.progress(frame.index + 1, declared)

    def _frames(self, want: Callable[[int], bool] | None) -> Iterator[DecodedFrame]:
        if self.workers > 1:
            from vcn.media.parallel import plan_segments

            plan = plan_segments(self.path)
            if plan is not None and len(plan.starts) > 1:
                yield from self._parallel_frames(plan, want)
                return
        yield from self._one_pass(want)

    def _parallel_frames(self, plan, want: Callable[[int], bool] | None) -> Iterator[DecodedFrame]:
        """Frames decoded by segment in worker processes; the rest in one pass if a segment fails."""
        from vcn.media.parallel import SegmentFailed, parallel_frames

        self.report = report = DecodeReport(declared_frames=self.info.frame_count)
        first_time: float | None = None
        try:
            for index, pts, t, key, image, full in parallel_frames(self, plan, want, self.workers):
                if first_time is None:
                    first_time = t
                yield DecodedFrame(
                    index=index, pts=pts, time_s=float(t - first_time), key_frame=key, image=image, full=full
                )
                report.frames = index + 1
        except SegmentFailed as exc:
            log.warning("%s: %s; decoding the rest in one pass", self.path, exc)
            resume = exc.index
            for frame in self._one_pass(lambda i: i >= resume and (want is None or want(i))):
                if frame.index >= resume:
                    yield frame
            return
        report.packets = plan.packets
        report.finished = True
        self._report_truncation(report)

    def _one_pass(self, want: Callable[[int], bool] | None) -> Iterator[DecodedFrame]:
        """Every frame from a single decoder, in this process."""
        for frame, picture in self.pictures():
            if want is None or want(frame.index):
                image, full = self.convert(picture, frame.index)
                frame = dataclasses.replace(frame, image=image, full=full)
            yield frame

    def pictures(self) -> Iterator[tuple[DecodedFrame, Any]]:
        """Every frame from a single decoder, in this process, with the decoder's picture still unconverted.

        For a caller that decides which pictures it wants only after later frames have come
        (:class:`vcn.media.scan.MovieScan`): it converts them with :meth:`convert`. The frames
        carry no image; ``report`` is filled in as for :meth:`frames`, and ``progress`` is not called.
        """
        import av

        self.report = report = DecodeReport(declared_frames=self.info.frame_count)
        with av.open(self.path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.threads:
                stream.codec_context.thread_count = self.threads
            first_time: float | None = None
            index = 0
            for decoded in self._decoded_packets(container, stream, report):
                for frame in decoded:
                    t = frame.time
                    if t is None:
                        t = index / self.info.fps if self.info.fps else 0.0
                    if first_time is None:
                        first_time = t
                    decoded_frame = DecodedFrame(
                        index=index, pts=frame.pts, time_s=float(t - first_time), key_frame=bool(frame.key_frame),
                        image=None,
                    )
                    yield decoded_frame, frame
                    index += 1
                    report.frames = index
        report.finished = True
        if report.frames == 0:
            raise EmptyVideoError(self.path, "no frame could be decoded")
        self._check_corruption(report, final=True)
        if report.bad_packets:
            report.warnings.append(f"{report.bad_packets} of {report.packets} packets could not be decoded and were skipped")
        self._report_truncation(report)

    def _report_truncation(self, report: DecodeReport) -> None:
        """Adds the truncation warning when the pass came up short, then logs the pass's warnings."""
        if report.truncated:
            report.warnings.append(
                f"truncated: decoded {report.frames} of {report.declared_frames} frames the container declares"
            )
        for message in report.warnings:
            log.warning("%s: %s", self.path, message)

    def _decoded_packets(self, container, stream, report: DecodeReport) -> Iterator[list]:
        """The frames of each packet in turn, undecodable packets skipped.

        A container that cannot be read further (a damaged packet header or
        index, a size that cannot be allocated) ends the stream like a cut-off
        file: the decoder gives up the frames it holds and a warning says where
        reading stopped.
        """
        import av

        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets, None)
            except av.error.FFmpegError as exc:
                report.warnings.append(
                    f"the container could not be read past packet {report.packets} ({exc}); decoding stopped there"
                )
                yield flush_decoder(stream)
                return
            if packet is None:
                return
            report.packets += 1
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                report.bad_packets += 1
                if report.bad_packets <= 3:
                    log.warning("%s: undecodable packet %d skipped (%s)", self.path, report.packets, exc)
                self._check_corruption(report)
                continue
            yield decoded

    def _check_corruption(self, report: DecodeReport, final: bool = False) -> None:
        bad, total = report.bad_packets, report.packets
        # Judge the whole stream at the end; mid-stream, give up only on one that is mostly garbage.
        limit = MAX_BAD_PACKET_FRACTION if final else max(MAX_BAD_PACKET_FRACTION, 0.8)
        if (final or total >= 200) and bad > limit * total:
            raise CorruptVideoError(
                self.path, f"{bad} of {total} packets failed to decode; the stream is corrupt"
            )

    def convert(self, frame, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A decoded picture as (image, full): RGB at the reader's size, and at the video's own when kept."""
        image = self._to_rgb(frame, index)
        if not self.keep_full:
            return image, None
        scaled = (self.out_width, self.out_height) != (self.info.width, self.info.height)
        return image, self._to_rgb(frame, index, full=True) if scaled else image

    def _to_rgb(self, frame, index: int, full: bool = False) -> np.ndarray:
        import av

        rotation = normalise_rotation(getattr(frame, "rotation", 0))
        w, h = (self.info.width, self.info.height) if full else (self.out_width, self.out_height)
        coded_w, coded_h = (h, w) if rotation in (90, 270) else (w, h)
        size = {"width": coded_w, "height": coded_h} if (coded_w, coded_h) != (frame.width, frame.height) else {}
        try:
            image = frame.to_ndarray(format="rgb24", **size)
        except av.error.FFmpegError:
            # A damaged stream header can declare a colour matrix libswscale does not know
            # ("Operation not supported"); read the frame with the standard-definition one.
            try:
                image = frame.to_ndarray(format="rgb24", src_colorspace="ITU601", **size)
            except av.error.FFmpegError as exc:
                raise CorruptVideoError(self.path, f"frame {index} cannot be converted to RGB ({exc})") from exc
        if rotation:
            image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
        return image
