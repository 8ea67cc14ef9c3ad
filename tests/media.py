"""Hostile and unusual video files for the bad-input tests.

Each ``make_*`` function writes one small file into ``directory`` with PyAV and
returns its path; each runs in well under a second. Those derived from a real
clip take it as ``source`` (the tests pass ``HAMILTON``); the others draw
their frames with numpy, so they contain no faces.

What FFmpeg 8 (PyAV 18.1) does with them on read, as checked by
``tests/test_media_fixtures.py``:

- ``make_not_a_video``, ``make_zero_length``, ``make_missing_moov``:
  ``av.open`` raises ``av.error.InvalidDataError``.
- ``make_truncated``: opens, and the index still announces every frame
  (``stream.frames``), but decoding stops quietly, without an error, after
  the frames whose bytes survived.
- ``make_corrupt``: opens; a plain ``for frame in container.decode(...)`` loop
  raises ``InvalidDataError`` partway, while decoding packet by packet and
  skipping the packets that raise recovers most frames.
- ``make_rotated``: the decoder does not rotate; frames keep the stored size
  and carry the angle in ``frame.rotation`` (display-matrix side data).
  ``stream.metadata['rotate']`` is neither written nor read by FFmpeg 8.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HAMILTON = Path(__file__).parent / "data" / "hamilton_clip.mp4"
"""The real clip the derived fixtures start from: 640x360, 29.97 fps, 275 frames, H.264 + AAC."""


def make_not_a_video(directory: Path) -> Path:
    """A text file with an ``.mp4`` name, as a user might drop by mistake."""
    path = Path(directory) / "not_a_video.mp4"
    path.write_text("This is a shopping list, not a video.\n" * 20)
    return path


def make_zero_length(directory: Path) -> Path:
    """An empty ``.mp4``, as left by a copy that failed before the first byte."""
    path = Path(directory) / "zero_length.mp4"
    path.write_bytes(b"")
    return path


def make_truncated(directory: Path, source: Path, fraction: float = 0.4) -> Path:
    """The first ``fraction`` of the bytes of ``source``, with its index kept.

    The source is first remuxed with ``movflags=faststart`` so that the
    ``moov`` atom (the sample index) sits before the media data and survives
    the cut; the file then opens, announces all the source's frames, and
    decodes only those whose bytes were kept. For a file that lost its index
    as well, see :func:`make_missing_moov`.
    """
    path = Path(directory) / "truncated.mp4"
    _remux(source, path, faststart=True)
    data = path.read_bytes()
    if _box_payload(data, "moov")[0] > _box_payload(data, "mdat")[0]:
        raise RuntimeError(f"{path}: faststart remux left moov after mdat")
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def make_missing_moov(directory: Path, source: Path, fraction: float = 0.4) -> Path:
    """The first ``fraction`` of the bytes of ``source`` with the ``moov`` atom at the end.

    This is what an interrupted recorder or download leaves behind: media data
    with no index, which FFmpeg refuses to open ("moov atom not found").
    """
    path = Path(directory) / "missing_moov.mp4"
    _remux(source, path, faststart=False)
    data = path.read_bytes()
    cut = int(len(data) * fraction)
    if _box_payload(data, "moov")[0] < cut:
        raise RuntimeError(f"{path}: moov lies in the kept {fraction:.0%} of the file")
    path.write_bytes(data[:cut])
    return path


def make_corrupt(
    directory: Path, source: Path, span: tuple[float, float] = (0.3, 0.6), seed: int = 0
) -> Path:
    """``source`` with random bytes over the ``span`` fraction of its media data.

    Only the payload of the ``mdat`` atom is overwritten, so the header and the
    index stay valid: the file opens and the damage shows only on decode.
    """
    data = bytearray(Path(source).read_bytes())
    payload_start, payload_end = _box_payload(data, "mdat")
    length = payload_end - payload_start
    start = payload_start + int(length * span[0])
    end = payload_start + int(length * span[1])
    data[start:end] = np.random.default_rng(seed).integers(0, 256, end - start, np.uint8).tobytes()
    path = Path(directory) / "corrupt.mp4"
    path.write_bytes(bytes(data))
    return path


def make_audio_only(directory: Path, seconds: float = 1.0, suffix: str = ".m4a") -> Path:
    """An MP4 container holding one AAC stream (a 440 Hz tone) and no video.

    Args:
        directory: Where to write.
        seconds: Length of the tone.
        suffix: ``.m4a`` as audio files are usually named, or ``.mp4`` to look
            like a video to code that filters on the extension.
    """
    path = Path(directory) / f"audio_only{suffix}"
    rate = 44100
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        samples = np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate) * 0.3
        chunk = 1024
        for start in range(0, len(samples), chunk):
            block = samples[start : start + chunk].astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


VFR_DELTAS_MS = (33, 50, 17, 100, 40, 25, 67)
"""Frame durations :func:`make_vfr` cycles through: 10 to 60 fps in one stream."""


def make_vfr(directory: Path, source: Path, frames: int = 60) -> Path:
    """The first ``frames`` frames of ``source`` re-encoded at a variable frame rate.

    Frame durations cycle through :data:`VFR_DELTAS_MS` on a 1/1000 s time
    base, so the pts deltas read back vary (the MP4 muxer rescales them to its
    own time base, 1/16000 here, keeping the ratios).
    """
    path = Path(directory) / "vfr.mp4"
    time_base = Fraction(1, 1000)

    def retimed(decoded: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        pts = 0
        for index, frame in zip(range(frames), decoded):
            out = frame.reformat(format="yuv420p")
            out.pts, out.time_base = pts, time_base
            out.pict_type = av.video.frame.PictureType.NONE  # let x264 choose, not the source
            pts += VFR_DELTAS_MS[index % len(VFR_DELTAS_MS)]
            yield out

    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        _encode(path, retimed(src.decode(stream)), stream.width, stream.height, time_base=time_base)
    return path


def make_rotated(directory: Path, source: Path, degrees: float = 90) -> Path:
    """``source`` stream-copied with a display matrix that rotates it by ``degrees``.

    ``degrees`` is counter-clockwise, the convention of ``VideoFrame.rotation``
    on read, which reports it folded into [-180, 180] (270 reads back as -90,
    180 as -180). A phone held upright typically records -90: the stored
    landscape frames must be turned 90 degrees clockwise for display. The
    pixels are untouched; only the container's display matrix (the ``tkhd``
    matrix in MP4) changes.
    """
    path = Path(directory) / f"rotated_{int(degrees)}.mp4"
    _remux(source, path, faststart=False, rotation=degrees)
    return path


def make_large(directory: Path, width: int = 7680, height: int = 4320, frames: int = 3) -> Path:
    """A very high-resolution H.264 video (8K by default) of a few frames of sliding colour."""
    path = Path(directory) / f"large_{width}x{height}.mp4"
    images = (_colour_frame(i, width, height) for i in range(frames))
    # Without lookahead x264 encodes 8K frames about three times faster.
    _encode(path, images, width, height, fps=24, tune="zerolatency")
    return path


def make_synthetic(
    directory: Path, frames: int = 48, size: tuple[int, int] = (320, 240), fps: int = 24
) -> Path:
    """Plain moving colour (a sliding gradient with drifting hue), no faces.

    Args:
        directory: Where to write.
        frames: Number of frames.
        size: ``(width, height)``, both even (yuv420p).
        fps: Constant frame rate.
    """
    width, height = size
    path = Path(directory) / f"synthetic_{width}x{height}_{frames}f_{fps}fps.mp4"
    _encode(path, (_colour_frame(i, width, height) for i in range(frames)), width, height, fps=fps)
    return path


def make_with_cuts(
    directory: Path,
    cuts: Iterable[int] = (16, 40),
    frames: int = 64,
    size: tuple[int, int] = (320, 240),
    fps: int = 24,
    keyint: int | None = None,
) -> Path:
    """Synthetic shots separated by hard cuts at the given frame indices.

    Each shot has its own flat colour with a bar moving across it, so frames
    change a little within a shot and completely at each cut: frame ``c`` for
    ``c`` in ``cuts`` is the first frame of a new shot. ``keyint``: a key frame
    every so many frames, and nowhere else.
    """
    width, height = size
    cuts = sorted(cuts)
    palette = [(60, 90, 200), (200, 60, 130), (120, 200, 40), (30, 140, 110), (230, 110, 190)]

    def shots() -> Iterator[np.ndarray]:
        for index in range(frames):
            shot = sum(index >= cut for cut in cuts)
            luma, cb, cr = palette[shot % len(palette)]
            image = _yuv420p(width, height, luma, cb, cr)
            x = (index * 7) % (width - 16)
            image[:height, x : x + 16] = 255 - luma
            yield image

    path = Path(directory) / f"with_cuts_{'_'.join(map(str, cuts))}{f'_k{keyint}' if keyint else ''}.mp4"
    _encode(path, shots(), width, height, fps=fps, keyint=keyint)
    return path


def _encode(
    path: Path,
    frames: Iterable[np.ndarray | av.VideoFrame],
    width: int,
    height: int,
    fps: int = 24,
    time_base: Fraction | None = None,
    tune: str | None = None,
    keyint: int | None = None,
) -> None:
    """Encode yuv420p frames to H.264 with the fastest x264 preset.

    Numpy frames are laid out as PyAV's ``yuv420p`` ndarray (``height * 3 // 2``
    rows) and get consecutive pts at ``fps``; ``VideoFrame`` objects keep the
    pts they carry, on ``time_base``. ``tune`` is an x264 tune such as
    ``zerolatency``; ``keyint`` puts a key frame every so many frames, and nowhere else.
    """
    with av.open(str(path), "w") as container:
        options = {"preset": "ultrafast"} | ({"tune": tune} if tune else {})
        if keyint:
            options["x264-params"] = f"keyint={keyint}:min-keyint={keyint}:scenecut=0"
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for index, image in enumerate(frames):
            if isinstance(image, np.ndarray):
                frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
                frame.pts = index
            else:
                frame = image
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _remux(source: Path, path: Path, faststart: bool, rotation: float | None = None) -> None:
    """Stream-copy every stream of ``source`` into a new MP4, optionally rotated."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(source)) as src, av.open(str(path), "w", options=options) as dst:
        streams = {}
        for stream in src.streams:
            streams[stream.index] = copy = dst.add_stream_from_template(stream)
            if rotation is not None and stream.type == "video":
                copy.set_display_rotation(rotation)
        for packet in src.demux():
            if packet.dts is None:  # the flush packet that ends each stream
                continue
            packet.stream = streams[packet.stream.index]
            dst.mux(packet)


def _colour_frame(index: int, width: int, height: int) -> np.ndarray:
    """One yuv420p frame of a horizontal luma ramp sliding right, hue drifting with ``index``."""
    image = _yuv420p(width, height, 0, 128 + (index * 9) % 100 - 50, 128 - (index * 5) % 80 + 40)
    ramp = (np.arange(width) * 256 // width + index * 8) % 256
    image[:height] = ramp.astype(np.uint8)[None, :]
    return image


def _yuv420p(width: int, height: int, luma: int, cb: int, cr: int) -> np.ndarray:
    """A flat yuv420p frame in PyAV's ndarray layout: the Y rows, then U and V, two rows per row."""
    image = np.empty((height * 3 // 2, width), np.uint8)
    image[:height] = luma
    image[height : height + height // 4] = cb
    image[height + height // 4 :] = cr
    return image


def _boxes(data: bytes) -> Iterator[tuple[str, int, int, int]]:
    """Top-level MP4 boxes as ``(type, offset, header_size, size)``."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
            header = 16
        elif size == 0:  # box runs to the end of the file
            size = len(data) - offset
        if size < header:
            raise ValueError(f"malformed MP4 box {kind!r} at byte {offset}")
        yield kind.decode("latin-1"), offset, header, size
        offset += size


def _box_payload(data: bytes, kind: str) -> tuple[int, int]:
    """``(start, end)`` byte range of the payload of the first top-level ``kind`` box."""
    for found, offset, header, size in _boxes(data):
        if found == kind:
            return offset + header, offset + size
    raise ValueError(f"no top-level {kind!r} box")
