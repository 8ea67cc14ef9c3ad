"""What a video file is, read from its container and its first decodable frame."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from vcn.errors import (
    EmptyVideoError,
    NotAVideoError,
    NoVideoStreamError,
    UnsupportedCodecError,
    VideoNotFoundError,
    VideoTooLargeError,
)

#: Largest frame the platform accepts, in pixels (8K UHD is 33 Mpx; this is 8192 x 8192).
#: Larger frames are refused before decoding rather than exhausting memory mid-run.
MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class VideoInfo:
    """Container-level facts about a video, as displayed (rotation applied).

    Attributes:
        path: The file.
        width, height: Displayed frame size in pixels, after applying ``rotation``.
        coded_width, coded_height: Frame size as stored in the stream.
        rotation: Counter-clockwise degrees (0, 90, 180, 270) the stored frames are
            turned to be shown upright, from the stream's display matrix.
        fps: Average frame rate (frames per second) the container reports.
        frame_count: Number of frames the container declares; 0 when unknown.
        duration_s: Stream duration in seconds; 0.0 when unknown.
        codec: Video codec name.
        has_audio: Whether the container also holds an audio stream.
        size_bytes: File size.
    """

    path: str
    width: int
    height: int
    coded_width: int
    coded_height: int
    rotation: int
    fps: float
    frame_count: int
    duration_s: float
    codec: str
    has_audio: bool
    size_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def normalise_rotation(degrees: float | None) -> int:
    """Rounds a display-matrix angle to a quarter turn in [0, 360)."""
    if degrees is None:
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


def probe_video(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> VideoInfo:
    """Opens ``path``, checks it is a decodable video and returns its facts.

    Decodes packets until the first frame comes out, which proves the stream is
    usable and yields the rotation (carried per frame by FFmpeg).

    Raises:
        VideoNotFoundError: no such file.
        NotAVideoError: FFmpeg cannot open it as a media container (includes empty files).
        NoVideoStreamError: no video stream (an audio-only file, for example).
        UnsupportedCodecError: the video stream's codec is unknown or has no decoder.
        EmptyVideoError: a video stream without a single decodable frame.
        VideoTooLargeError: frames above ``max_pixels``.
    """
    import av

    p = Path(path)
    if not p.exists():
        raise VideoNotFoundError(p, "no such file")
    if not p.is_file():
        raise VideoNotFoundError(p, "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise NotAVideoError(p, "the file is empty (0 bytes)")
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise NotAVideoError(p, f"not a media file FFmpeg can open ({exc.__class__.__name__}: {exc})") from exc
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise NoVideoStreamError(p, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise UnsupportedCodecError(p, "the video stream's codec is unknown or FFmpeg has no decoder for it")
        coded_w, coded_h = int(ctx.width or 0), int(ctx.height or 0)
        if coded_w * coded_h > max_pixels:
            raise VideoTooLargeError(
                p, f"frame size {coded_w}x{coded_h} exceeds the limit of {max_pixels} pixels"
            )
        first = _first_frame(container, stream)
        if first is None:
            raise EmptyVideoError(p, "the video stream has no decodable frame")
        coded_w, coded_h = first.width, first.height
        if coded_w * coded_h > max_pixels:
            raise VideoTooLargeError(
                p, f"frame size {coded_w}x{coded_h} exceeds the limit of {max_pixels} pixels"
            )
        rotation = normalise_rotation(getattr(first, "rotation", 0))
        width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration_s = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * Fraction(stream.time_base))
        elif container.duration is not None:
            duration_s = container.duration / 1_000_000
        return VideoInfo(
            path=str(p),
            width=width,
            height=height,
            coded_width=coded_w,
            coded_height=coded_h,
            rotation=rotation,
            fps=fps,
            frame_count=int(stream.frames or 0),
            duration_s=duration_s,
            codec=ctx.name or "unknown",
            has_audio=bool(container.streams.audio),
            size_bytes=size,
        )


def _first_frame(container, stream):
    """The first frame the decoder yields, or None when none can be decoded.

    A container that cannot be read further (a damaged index or packet header)
    ends the search as the end of the file does, after the decoder gives up
    the frames it still holds.
    """
    import av

    failures = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
        except av.error.FFmpegError:
            return next(iter(flush_decoder(stream)), None)
        if packet is None:
            return None
        try:
            for frame in packet.decode():
                return frame
        except av.error.FFmpegError:
            failures += 1
            if failures > 64:
                return None


def flush_decoder(stream) -> list:
    """The frames the stream's decoder still holds, drained; none if draining fails."""
    import av

    try:
        return list(stream.decode(None))
    except av.error.FFmpegError:
        return []
