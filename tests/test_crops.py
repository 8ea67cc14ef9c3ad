"""Crop sampling, alignment, filtering and storage."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from vcn.faces.crops import (
    CropConfig,
    read_crop_images,
    select_crops,
    write_track_crops,
)
from vcn.faces.detection import create_detector
from vcn.faces.detection.video import DETECTIONS_SCHEMA, LANDMARK_COLUMNS
from vcn.faces.filters import FilterConfig
from vcn.media import VideoReader


def _rows(entries):
    """entries: (detection_id, frame, track_id, box, landmarks(5,2))."""
    cols = {k: [] for k in DETECTIONS_SCHEMA}
    for det_id, frame, _, box, lm in entries:
        cols["detection_id"].append(det_id)
        cols["frame"].append(frame)
        cols["shot_id"].append(0)
        cols["time_s"].append(frame / 29.97)
        for k, v in zip(("x1", "y1", "x2", "y2"), box):
            cols[k].append(float(v))
        cols["score"].append(0.99)
        for k, v in zip(LANDMARK_COLUMNS, np.asarray(lm, float).ravel()):
            cols[k].append(float(v))
        cols["appearance"].append(b"")
    table = pl.DataFrame(cols, schema=DETECTIONS_SCHEMA).drop("appearance")
    return table.with_columns(pl.Series("track_id", [e[2] for e in entries], dtype=pl.Int64))


def test_select_crops_takes_one_per_interval_per_track():
    lm = np.zeros((5, 2))
    entries = [(i, f, 0, (0, 0, 50, 50), lm) for i, f in enumerate(range(0, 40, 4))]
    entries.append((99, 8, None, (0, 0, 50, 50), lm))
    chosen = select_crops(_rows(entries), every_s=0.25)
    # Samples every 4 frames at 29.97 fps = 0.133 s: every second sample is taken.
    assert chosen["frame"].to_list() == [0, 8, 16, 24, 32]
    assert 99 not in chosen["detection_id"].to_list()


def test_crops_are_aligned_filtered_and_stored(hamilton, tmp_path):
    reader = VideoReader(hamilton)
    frame = next(f for f in reader.frames(want=lambda i: i == 120) if f.index == 120)
    found = create_detector("retinaface").detect([frame.image])[0]
    assert len(found) >= 1
    box, lm = found.boxes[0], found.landmarks[0]
    degenerate = np.repeat(lm[:1], 5, axis=0)
    table = _rows([(0, 120, 0, box, lm), (1, 120, 1, box, degenerate)])
    out = tmp_path / "crops.parquet"
    config = CropConfig(template="arcface-112", filters=FilterConfig(min_sharpness=0.0))
    meta = write_track_crops(VideoReader(hamilton), table, out, config)
    assert meta.sort("detection_id")["reject_reason"].to_list() == [None, "unalignable"]
    ids, images = read_crop_images(out)
    assert images.shape == (2, 112, 112, 3)
    assert images[ids.tolist().index(meta.filter(pl.col("detection_id") == 0)["crop_id"][0])].mean() > 20


def test_crops_need_full_resolution(hamilton, tmp_path):
    with pytest.raises(ValueError, match="full-resolution"):
        write_track_crops(VideoReader(hamilton, max_side=320), _rows([]), tmp_path / "x.parquet")


def test_no_tracks_gives_an_empty_file(hamilton, tmp_path):
    out = tmp_path / "crops.parquet"
    meta = write_track_crops(VideoReader(hamilton), _rows([]), out)
    assert meta.height == 0 and pl.read_parquet(out).height == 0


def _hamilton_detections(hamilton, chips_path, template: str):
    """The Hamilton clip's detections at the pipeline's settings, with every detection's chip cut in the same pass."""
    from vcn.faces.crops import ChipWriter, detections_key
    from vcn.faces.detection.video import detect_video_faces
    from vcn.media.frames import build_frame_index, sample_stride
    from vcn.media.shots import scan_shots

    reader = VideoReader(hamilton, max_side=640, keep_full=True)
    scan = scan_shots(VideoReader(hamilton))
    frames = build_frame_index(scan.frame_times, scan.shots, sample_stride(reader.info.fps))
    with ChipWriter(chips_path, template) as chips:
        detections = detect_video_faces(reader, frames, create_detector("retinaface"), chips=chips)
        chips.detections = detections_key(detections)
    assert chips.count == detections.height > 0
    return detections, frames


@pytest.mark.parametrize("template", ["arcface-112", "dlib-150"])
def test_crops_from_the_detection_pass_chips_are_the_crops_cut_from_the_video(hamilton, tmp_path, template):
    from vcn.faces.crops import chips_info, detections_key, track_crops_from_chips
    from vcn.faces.detection.video import appearance_matrix
    from vcn.faces.tracking import TrackerConfig, track_detections

    chips_path = tmp_path / "chips.parquet"
    detections, frames = _hamilton_detections(hamilton, chips_path, template)
    assert chips_info(chips_path).template == template
    assert chips_info(chips_path).detections == detections_key(detections)
    samples_per_s = frames["sampled"].sum() / frames["time_s"].max()
    tracked = track_detections(detections, appearance_matrix(detections), samples_per_s, TrackerConfig()).drop(
        "appearance"
    )
    config = CropConfig(template=template)
    decoded = write_track_crops(VideoReader(hamilton), tracked, tmp_path / "decoded.parquet", config)
    chipped = track_crops_from_chips(chips_path, tracked, tmp_path / "chipped.parquet", config)
    assert decoded.height > 20
    assert chipped.equals(decoded)
    # The same crops, byte for byte: the same frame, landmarks and JPEG encoder.
    assert pl.read_parquet(tmp_path / "chipped.parquet").equals(pl.read_parquet(tmp_path / "decoded.parquet"))
    with pytest.raises(ValueError, match="aligned for"):
        track_crops_from_chips(chips_path, tracked, tmp_path / "x.parquet", CropConfig(template="dlib-150" if template != "dlib-150" else "arcface-112"))


def test_chips_lacking_a_chosen_detection_are_refused(hamilton, tmp_path):
    from vcn.faces.crops import ChipWriter, track_crops_from_chips

    chips_path = tmp_path / "chips.parquet"
    reader = VideoReader(hamilton)
    frame = next(f for f in reader.frames(want=lambda i: i == 120) if f.index == 120)
    found = create_detector("retinaface").detect([frame.image])[0]
    with ChipWriter(chips_path, "arcface-112") as chips:
        chips.add(frame.image, np.array([0]), found.landmarks[:1].astype(np.float32))
    table = _rows([(0, 120, 0, found.boxes[0], found.landmarks[0]), (1, 124, 0, found.boxes[0], found.landmarks[0])])
    with pytest.raises(ValueError, match="lack 1 of the 2"):
        track_crops_from_chips(chips_path, table, tmp_path / "x.parquet", CropConfig(template="arcface-112", every_s=0.0))
