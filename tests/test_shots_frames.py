"""Shot detection and the frame index."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tests import media
from tests.conftest import HAMILTON_CUTS
from vcn.media import VideoReader
from vcn.media.frames import (
    FRAMES_SCHEMA,
    build_frame_index,
    read_frame_times,
    sample_stride,
    sampled_mask,
    shot_ids_for_frames,
)
from vcn.media.shots import ShotConfig, detect_shots, scan_shots, shots_from_cuts


def test_hamilton_cuts_are_found(hamilton):
    shots = detect_shots(VideoReader(hamilton))
    starts = shots["start_frame"].to_list()
    assert starts[0] == 0 and shots["end_frame"][-1] == 274
    assert len(starts) == len(HAMILTON_CUTS) + 1
    for found, expected in zip(starts[1:], HAMILTON_CUTS):
        assert abs(found - expected) <= 1
    # Shots tile the video without gaps or overlaps.
    assert (shots["start_frame"][1:].to_numpy() == shots["end_frame"][:-1].to_numpy() + 1).all()


def test_synthetic_cuts_are_found_exactly(tmp_path):
    path = media.make_with_cuts(tmp_path, cuts=(16, 40), frames=64)
    shots = detect_shots(VideoReader(path), ShotConfig(min_shot_s=0.2))
    assert shots["start_frame"].to_list() == [0, 16, 40]


def test_unknown_detector_is_refused(hamilton):
    with pytest.raises(ValueError, match="unknown shot detector"):
        detect_shots(VideoReader(hamilton), ShotConfig(detector="magic"))


def test_shots_from_cuts_ignores_out_of_range_and_duplicates():
    times = np.arange(10) / 10
    table = shots_from_cuts([0, 4, 4, 12], times)
    assert table.select("start_frame", "end_frame").rows() == [(0, 3), (4, 9)]
    assert table["end_s"].to_list() == [0.3, 0.9]


def test_sample_stride():
    assert sample_stride(24.0) == 3
    assert sample_stride(29.97) == 4
    assert sample_stride(8.0) == 1
    assert sample_stride(0.0) == 1
    with pytest.raises(ValueError):
        sample_stride(24.0, detect_fps=0)


def test_sampling_restarts_at_every_shot():
    shot_of = np.array([0] * 7 + [1] * 5)
    mask = sampled_mask(shot_of, 3)
    assert np.flatnonzero(mask).tolist() == [0, 3, 6, 7, 10]


def test_frame_index_of_hamilton(hamilton):
    reader = VideoReader(hamilton)
    scan = scan_shots(reader)
    shots = scan.shots
    assert shots.equals(detect_shots(VideoReader(hamilton)))
    # The shots pass's frame timing is what a pass of its own over the video gives.
    assert scan.frame_times.equals(read_frame_times(VideoReader(hamilton)))
    index = build_frame_index(scan.frame_times, shots, stride=4)
    assert index.schema == FRAMES_SCHEMA
    assert index.height == 275
    assert index["frame"].to_list() == list(range(275))
    assert index["key_frame"][0]
    first_of_shot = index.group_by("shot_id").agg(pl.col("frame").min()).sort("shot_id")["frame"].to_list()
    assert first_of_shot == shots["start_frame"].to_list()
    # Every shot's first frame is sampled, and samples are 4 frames apart inside a shot.
    sampled = index.filter(pl.col("sampled"))
    assert set(first_of_shot) <= set(sampled["frame"].to_list())
    gaps = sampled.with_columns(pl.col("frame").diff().over("shot_id").alias("gap"))["gap"].drop_nulls()
    assert set(gaps.to_list()) == {4}


def test_frame_index_refuses_timing_without_its_columns():
    shots = shots_from_cuts([], np.arange(3) / 5.0)
    with pytest.raises(ValueError, match="pts"):
        build_frame_index(pl.DataFrame({"frame": [0, 1, 2], "time_s": [0.0, 0.2, 0.4], "key_frame": [True] * 3}),
                          shots, stride=2)


def test_shot_ids_for_frames_beyond_the_table():
    shots = shots_from_cuts([3], np.arange(5) / 5.0)
    assert shot_ids_for_frames(shots, 7).tolist() == [0, 0, 0, 1, 1, 1, 1]
