"""Probing and streaming decode, including every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tests import media
from vcn.errors import (
    CorruptVideoError,
    NotAVideoError,
    NoVideoStreamError,
    VideoNotFoundError,
    VideoTooLargeError,
)
from vcn.media import VideoReader, probe_video, scaled_size


def test_probe_reports_the_clip(hamilton):
    info = probe_video(hamilton)
    assert (info.width, info.height, info.rotation) == (640, 360, 0)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    assert info.frame_count == 275
    assert info.codec == "h264" and info.has_audio


def test_decode_streams_every_frame_and_converts_only_wanted(hamilton):
    reader = VideoReader(hamilton, max_side=320)
    seen = []
    for frame in reader.frames(want=lambda i: i % 50 == 0):
        seen.append(frame)
        assert (frame.image is not None) == (frame.index % 50 == 0)
        if frame.image is not None:
            assert frame.image.shape == (180, 320, 3) and frame.image.dtype == np.uint8
    assert [f.index for f in seen] == list(range(275))
    times = np.array([f.time_s for f in seen])
    assert times[0] == 0.0 and np.all(np.diff(times) > 0)
    assert reader.report.frames == 275 and not reader.report.truncated and reader.report.warnings == []


def test_scaled_size_keeps_aspect_and_even_sides():
    assert scaled_size(1920, 1080, 640) == (640, 360)
    assert scaled_size(640, 360, 640) == (640, 360)
    assert scaled_size(1080, 1920, 640) == (360, 640)
    assert scaled_size(1000, 1000, None) == (1000, 1000)


def test_missing_path(tmp_path):
    with pytest.raises(VideoNotFoundError, match="no such file"):
        probe_video(tmp_path / "nope.mp4")


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoNotFoundError, match="not a regular file"):
        probe_video(tmp_path)


def test_text_file_is_not_a_video(tmp_path):
    with pytest.raises(NotAVideoError, match="not a media file"):
        probe_video(media.make_not_a_video(tmp_path))


def test_zero_length_file(tmp_path):
    with pytest.raises(NotAVideoError, match="empty"):
        probe_video(media.make_zero_length(tmp_path))


def test_file_without_index_is_not_a_video(tmp_path):
    with pytest.raises(NotAVideoError):
        probe_video(media.make_missing_moov(tmp_path, media.HAMILTON))


def test_audio_only_file(tmp_path):
    with pytest.raises(NoVideoStreamError, match="no video stream.*audio"):
        probe_video(media.make_audio_only(tmp_path))


def test_truncated_file_decodes_what_survives_and_says_so(tmp_path):
    reader = VideoReader(media.make_truncated(tmp_path, media.HAMILTON))
    n = sum(1 for _ in reader.frames(want=lambda _: False))
    assert 0 < n < 275
    assert reader.report.truncated
    assert any("truncated" in w for w in reader.report.warnings)


def test_damaged_stream_skips_bad_packets_and_reports_them(tmp_path):
    reader = VideoReader(media.make_corrupt(tmp_path, media.HAMILTON))
    n = sum(1 for _ in reader.frames(want=lambda _: False))
    assert n > 100
    assert reader.report.bad_packets > 0
    assert any("could not be decoded" in w for w in reader.report.warnings)


def test_stream_mostly_garbage_is_corrupt(tmp_path, monkeypatch):
    path = media.make_corrupt(tmp_path, media.HAMILTON)
    monkeypatch.setattr("vcn.media.decode.MAX_BAD_PACKET_FRACTION", 0.0)
    with pytest.raises(CorruptVideoError, match="packets failed to decode"):
        for _ in VideoReader(path).frames(want=lambda _: False):
            pass


def test_variable_frame_rate_keeps_true_timestamps(tmp_path):
    reader = VideoReader(media.make_vfr(tmp_path, media.HAMILTON, frames=30))
    times = np.array([f.time_s for f in reader.frames(want=lambda _: False)])
    deltas_ms = np.round(np.diff(times) * 1000).astype(int)
    assert len(times) == 30
    assert set(deltas_ms[:7]) == set(media.VFR_DELTAS_MS)


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotation_metadata_is_applied(tmp_path, degrees):
    path = media.make_rotated(tmp_path, media.HAMILTON, degrees=degrees)
    info = probe_video(path)
    assert info.rotation == degrees % 360
    upright = next(VideoReader(media.HAMILTON).frames()).image
    frame = next(VideoReader(path, info=info).frames()).image
    assert (info.width, info.height) == (frame.shape[1], frame.shape[0])
    expected = np.rot90(upright, k=(degrees % 360) // 90)
    assert np.abs(frame.astype(int) - expected.astype(int)).mean() < 1.0


def test_very_large_resolution_is_decoded_downscaled(tmp_path):
    path = media.make_large(tmp_path)
    info = probe_video(path)
    assert (info.width, info.height) == (7680, 4320)
    frames = list(VideoReader(path, max_side=640, info=info).frames())
    assert len(frames) == 3 and frames[0].image.shape == (360, 640, 3)


def test_resolution_above_the_limit_is_refused(tmp_path):
    path = media.make_synthetic(tmp_path, frames=2, size=(320, 240))
    with pytest.raises(VideoTooLargeError, match="320x240 exceeds"):
        probe_video(path, max_pixels=320 * 240 - 1)
