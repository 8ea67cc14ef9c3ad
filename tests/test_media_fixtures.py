"""Each hostile-media generator in ``tests/media.py`` makes what it claims, as PyAV reads it."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from tests.media import (
    HAMILTON,
    VFR_DELTAS_MS,
    make_audio_only,
    make_corrupt,
    make_large,
    make_missing_moov,
    make_not_a_video,
    make_rotated,
    make_synthetic,
    make_truncated,
    make_vfr,
    make_with_cuts,
    make_zero_length,
)

HAMILTON_FRAMES = 275


def decode_tolerantly(path: Path) -> tuple[list[av.VideoFrame], int]:
    """All video frames that decode, skipping packets that raise, and how many raised."""
    frames, errors = [], 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames.extend(stream.decode(packet))
            except av.error.InvalidDataError:
                errors += 1
    return frames, errors


def luma(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="gray").astype(np.int16)


def test_hamilton_index_sits_after_its_media_data():
    # The reason make_truncated remuxes with faststart before cutting.
    data = HAMILTON.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat")


@pytest.mark.parametrize("make", [make_not_a_video, make_zero_length])
def test_not_a_video_and_empty_file_do_not_open(tmp_path, make):
    path = make(tmp_path)
    assert path.suffix == ".mp4"
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(path))


def test_zero_length_is_empty(tmp_path):
    assert make_zero_length(tmp_path).stat().st_size == 0


def test_truncated_opens_and_decodes_only_a_prefix(tmp_path):
    path = make_truncated(tmp_path, HAMILTON)
    assert path.stat().st_size == pytest.approx(0.4 * HAMILTON.stat().st_size, rel=0.01)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.frames == HAMILTON_FRAMES  # the index still promises every frame
        decoded = sum(1 for _ in container.decode(stream))  # ends without raising
    assert 0.2 * HAMILTON_FRAMES < decoded < 0.6 * HAMILTON_FRAMES


def test_missing_moov_does_not_open(tmp_path):
    path = make_missing_moov(tmp_path, HAMILTON)
    assert path.stat().st_size == pytest.approx(0.4 * HAMILTON.stat().st_size, rel=0.01)
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(path))


def test_corrupt_opens_but_fails_to_decode_midway(tmp_path):
    path = make_corrupt(tmp_path, HAMILTON)
    original, damaged = HAMILTON.read_bytes(), path.read_bytes()
    assert len(damaged) == len(original)
    changed = np.flatnonzero(np.frombuffer(original, np.uint8) != np.frombuffer(damaged, np.uint8))
    assert 0.25 * len(original) < changed.size < 0.35 * len(original)
    # Only the middle changed: the header in front and the index (moov) behind are intact.
    assert 0.25 * len(original) < changed[0] and changed[-1] < 0.65 * len(original)

    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == HAMILTON_FRAMES
        with pytest.raises(av.error.InvalidDataError):
            for _ in container.decode(video=0):
                pass

    frames, errors = decode_tolerantly(path)
    assert errors > 0
    assert 0.5 * HAMILTON_FRAMES < len(frames) < HAMILTON_FRAMES


@pytest.mark.parametrize("suffix", [".m4a", ".mp4"])
def test_audio_only_has_no_video_stream(tmp_path, suffix):
    path = make_audio_only(tmp_path, seconds=1.0, suffix=suffix)
    assert path.suffix == suffix
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 0
        (stream,) = container.streams.audio
        assert stream.codec_context.name == "aac"
        samples = sum(frame.samples for frame in container.decode(stream))
    assert samples == pytest.approx(44100, abs=2048)


def test_vfr_pts_deltas_vary_as_written(tmp_path):
    path = make_vfr(tmp_path, HAMILTON, frames=60)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = sorted(frame.pts for frame in container.decode(stream))
        seconds = np.diff(pts) * float(stream.time_base)
    assert len(pts) == 60
    expected = [VFR_DELTAS_MS[i % len(VFR_DELTAS_MS)] / 1000 for i in range(59)]
    np.testing.assert_allclose(seconds, expected, atol=1e-3)
    assert len(set(np.round(seconds, 3))) == len(VFR_DELTAS_MS)


@pytest.mark.parametrize(("degrees", "read_back"), [(90, 90), (-90, -90), (180, -180), (270, -90)])
def test_rotated_carries_a_display_matrix_and_keeps_stored_pixels(tmp_path, degrees, read_back):
    path = make_rotated(tmp_path, HAMILTON, degrees=degrees)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert "rotate" not in stream.metadata  # FFmpeg 8 no longer uses the tag
        assert stream.frames == HAMILTON_FRAMES
        frame = next(container.decode(stream))
    assert frame.rotation == read_back  # counter-clockwise, folded into [-180, 180]
    assert av.sidedata.sidedata.Type.DISPLAYMATRIX in {data.type for data in frame.side_data}
    assert (frame.width, frame.height) == (640, 360)  # the decoder does not rotate


def test_unrotated_source_reports_no_rotation():
    with av.open(str(HAMILTON)) as container:
        assert next(container.decode(video=0)).rotation == 0


def test_large_is_8k(tmp_path):
    path = make_large(tmp_path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (7680, 4320)
        frames = list(container.decode(stream))
    assert len(frames) == 3
    assert (frames[-1].width, frames[-1].height) == (7680, 4320)


def test_synthetic_has_requested_shape_and_moves(tmp_path):
    path = make_synthetic(tmp_path, frames=30, size=(160, 96), fps=15)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 15
        frames = [luma(frame) for frame in container.decode(stream)]
    assert len(frames) == 30
    assert frames[0].shape == (96, 160)
    assert all(np.abs(b - a).mean() > 1 for a, b in zip(frames, frames[1:]))


def test_with_cuts_changes_completely_only_at_the_cuts(tmp_path):
    path = make_with_cuts(tmp_path, cuts=(10, 25), frames=40)
    with av.open(str(path)) as container:
        frames = [luma(frame) for frame in container.decode(video=0)]
    assert len(frames) == 40
    change = [np.abs(b - a).mean() for a, b in zip(frames, frames[1:])]
    jumps = [i + 1 for i, value in enumerate(change) if value > 20]
    assert jumps == [10, 25]
