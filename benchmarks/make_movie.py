"""Build a long test movie from real footage, for benchmarks at feature length.

The movie is a random edit of the clips in ``shared/data/videos``: segments of
1-4 s, mostly alternating between clips, from random start points, some
mirrored left-right, each scaled (and letterboxed if its aspect differs) to a
16:9 frame and re-timed to a constant frame rate. Every segment boundary is a
hard cut; the Hamilton clip adds about three cuts of its own inside longer
segments. The video is H.264 (libx264 ``veryfast``, CRF 23, yuv420p) with no
audio, and a JSON file next to it lists the segments and cut frames.

The footage shows real, identifiable people and may be used for research and
testing inside the project only (see ``PROVENANCE.md`` beside the clips), so
write the movies under ``benchmarks/work/``, which git ignores.

Frames are encoded as they are produced, so memory does not grow with the
movie's length; it does hold every source clip decoded at the output size
(about 0.55 GB at 720p for the two shipped clips, 380 frames).

Usage::

    python benchmarks/make_movie.py --minutes 5 --out benchmarks/work/movie_5min.mp4
"""

from __future__ import annotations

import argparse
import bisect
import json
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
SOURCES = (
    VIDEOS / "face_recognition_short_hamilton_clip.mp4",
    VIDEOS / "facenet-pytorch_video.mp4",
)
SEGMENT_SECONDS = (1.0, 4.0)
"""Range of segment lengths: about 20 cuts a minute, the pace of an edited programme."""
SWITCH_PROBABILITY = 0.75
"""Chance that the next segment comes from another clip; otherwise it is a jump cut within one."""
MIRROR_PROBABILITY = 0.4


@dataclass(frozen=True)
class Segment:
    """One stretch of the movie, copied from one source clip.

    Attributes:
        start_frame: First frame of the segment in the movie.
        frames: Number of movie frames.
        source: File name of the source clip.
        source_start: Offset in the source of the segment's first frame, in seconds
            from the source's first frame.
        mirrored: Whether the segment is flipped left-right.
    """

    start_frame: int
    frames: int
    source: str
    source_start: float
    mirrored: bool


class _Clip:
    """A source clip decoded once, scaled and letterboxed to the movie's frame."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.name = path.name
        self.frames: list[av.VideoFrame] = []
        self.times: list[float] = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            graph = _filters(
                f"scale={width}:{height}:force_original_aspect_ratio=decrease",
                f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2",
                "format=yuv420p",
                template=stream,
            )
            for frame in container.decode(stream):
                graph.push(frame)
                scaled = graph.pull()
                # Decoded frames keep their I/P/B type, which libx264 would obey.
                scaled.pict_type = av.video.frame.PictureType.NONE
                self.frames.append(scaled)
                self.times.append(float(frame.time))
        if not self.frames:
            raise ValueError(f"{path}: no video frames")
        first = self.times[0]
        self.times = [t - first for t in self.times]
        step = (self.times[-1] / (len(self.times) - 1)) if len(self.times) > 1 else 0.04
        self.duration = self.times[-1] + step

    def frame_at(self, seconds: float) -> av.VideoFrame:
        """The frame on screen ``seconds`` after the clip's first frame."""
        return self.frames[max(bisect.bisect_right(self.times, seconds) - 1, 0)]


def build_movie(
    out: Path,
    minutes: float,
    height: int = 720,
    fps: int = 24,
    seed: int = 0,
    *,
    sources: tuple[Path, ...] = SOURCES,
) -> Path:
    """Write a ``minutes``-long random edit of ``sources`` to ``out``.

    Args:
        out: Output ``.mp4``; ``out.with_suffix(".json")`` receives the edit list.
        minutes: Length of the movie.
        height: Frame height; the width is 16:9 of it.
        fps: Constant output frame rate; sources are re-timed by showing, at
            each output instant, the source frame on screen then.
        seed: Seed of the edit; the same seed gives the same movie.
        sources: Clips to cut from.

    Returns:
        ``out``.
    """
    if height % 2:
        raise ValueError(f"height must be even for yuv420p, got {height}")
    out = Path(out)
    width = round(height * 16 / 9 / 2) * 2
    total = round(minutes * 60 * fps)
    clips = [_Clip(path, width, height) for path in sources]
    segments = _plan(clips, total, fps, np.random.default_rng(seed))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream(
            "libx264", rate=fps, options={"preset": "veryfast", "crf": "23"}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        mirror = _filters(
            "hflip", width=width, height=height, format="yuv420p", time_base=Fraction(1, fps)
        )
        by_name = {clip.name: clip for clip in clips}
        with tqdm(total=total, unit="frame", desc=out.name) as progress:
            for segment in segments:
                clip = by_name[segment.source]
                for k in range(segment.frames):
                    frame = clip.frame_at(segment.source_start + k / fps)
                    if segment.mirrored:
                        mirror.push(frame)
                        frame = mirror.pull()
                    frame.pts, frame.time_base = segment.start_frame + k, Fraction(1, fps)
                    container.mux(stream.encode(frame))
                progress.update(segment.frames)
        container.mux(stream.encode(None))
    partial.replace(out)

    edit = {
        "width": width,
        "height": height,
        "fps": fps,
        "frames": total,
        "seed": seed,
        "cuts": [segment.start_frame for segment in segments[1:]],
        "segments": [asdict(segment) for segment in segments],
    }
    out.with_suffix(".json").write_text(json.dumps(edit, indent=1))
    return out


def _plan(clips: list[_Clip], total: int, fps: int, rng: np.random.Generator) -> list[Segment]:
    """Cut ``total`` frames into random segments of the clips."""
    segments: list[Segment] = []
    current = int(rng.integers(len(clips)))
    start_frame = 0
    while start_frame < total:
        switch = len(clips) > 1 and rng.random() < SWITCH_PROBABILITY
        if segments and switch:
            current = (current + int(rng.integers(1, len(clips)))) % len(clips)
        clip = clips[current]
        seconds = min(rng.uniform(*SEGMENT_SECONDS), clip.duration)
        frames = min(max(round(seconds * fps), 1), total - start_frame)
        source_start = rng.uniform(0, clip.duration - frames / fps)
        mirrored = bool(rng.random() < MIRROR_PROBABILITY)
        if segments and not switch:
            # A jump cut within one clip flips the mirroring, so that it stays a
            # visible cut even when the new start lands next to the old one.
            mirrored = not segments[-1].mirrored
        segments.append(
            Segment(
                start_frame=start_frame,
                frames=frames,
                source=clip.name,
                source_start=round(float(source_start), 3),
                mirrored=mirrored,
            )
        )
        start_frame += frames
    return segments


def _filters(*filters: str, **buffer: object) -> av.filter.Graph:
    """A configured chain of FFmpeg video filters, one frame out for each frame in.

    Args:
        *filters: Filters in FFmpeg syntax, ``name=args``.
        **buffer: Description of the input frames for ``Graph.add_buffer``:
            ``template=stream``, or ``width``, ``height``, ``format`` and ``time_base``.
    """
    graph = av.filter.Graph()
    chain = [graph.add_buffer(**buffer)]
    for spec in filters:
        name, _, args = spec.partition("=")
        chain.append(graph.add(name, args or None))
    chain.append(graph.add("buffersink"))
    for upstream, downstream in zip(chain, chain[1:]):
        upstream.link_to(downstream)
    graph.configure()
    return graph


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="length of the movie")
    parser.add_argument(
        "--out", type=Path, required=True, help="output .mp4, under benchmarks/work/"
    )
    parser.add_argument("--height", type=int, default=720, help="frame height; width is 16:9")
    parser.add_argument("--fps", type=int, default=24, help="output frame rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random edit")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = build_movie(args.out, args.minutes, height=args.height, fps=args.fps, seed=args.seed)
    elapsed = time.perf_counter() - started
    edit = json.loads(out.with_suffix(".json").read_text())
    print(
        f"{out}: {edit['frames']} frames {edit['width']}x{edit['height']} at {edit['fps']} fps, "
        f"{len(edit['segments'])} segments, {len(edit['cuts'])} cut positions, "
        f"{out.stat().st_size / 1e6:.1f} MB, built in {elapsed:.0f} s"
    )


if __name__ == "__main__":
    main()
