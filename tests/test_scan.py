"""One pass for shots, frame index and detection gives what the separate passes give."""

from __future__ import annotations

import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import vcn.media.scan as scan_module
from tests import media
from vcn.faces.crops import ChipWriter
from vcn.faces.detection.video import detect_faces, detect_video_faces
from vcn.media import VideoReader
from vcn.media.frames import build_frame_index
from vcn.media.scan import CutBehindWindow, MovieScan, OnePassUnavailable
from vcn.media.shots import ShotConfig, ShotCutter, scan_shots


@pytest.fixture(scope="module")
def detector():
    from vcn.faces.detection.retinaface import RetinaFaceDetector

    return RetinaFaceDetector(threads=2, engine="onnxruntime")


def _separate(path, config: ShotConfig, stride: int, detector, chips_path):
    """Today's passes: shots (and frame timing), then detection with chips."""
    reader = VideoReader(path, max_side=640, keep_full=True)
    shot_scan = scan_shots(reader, config)
    frames = build_frame_index(shot_scan.frame_times, shot_scan.shots, stride)
    with ChipWriter(chips_path, "arcface-112") as chips:
        detections = detect_video_faces(reader, frames, detector, chips=chips)
    return shot_scan.shots, shot_scan.frame_times, frames, detections, pl.read_parquet(chips_path)


def _one_pass(path, config: ShotConfig, stride: int, detector, chips_path):
    reader = VideoReader(path, max_side=640, keep_full=True)
    scan = MovieScan(reader, config, stride)
    source = ((frame, shot, frame.time_s) for frame, shot in scan.sampled_frames())
    started = time.perf_counter()
    with ChipWriter(chips_path, "arcface-112") as chips:
        detections = detect_faces(source, reader, detector, chips=chips)
    # The pass's own time leaves out the detector's, which is most of the whole here.
    assert 0.0 < scan.seconds < 0.9 * (time.perf_counter() - started)
    assert reader.report.frames == scan.frames.height and reader.report.finished
    return scan.shot_scan.shots, scan.shot_scan.frame_times, scan.frames, detections, pl.read_parquet(chips_path)


@pytest.mark.parametrize("kind", ["content", "adaptive"])
def test_one_pass_gives_the_shots_frames_detections_and_chips_of_separate_passes(tmp_path, detector, kind):
    config = ShotConfig(detector=kind)
    separate = _separate(media.HAMILTON, config, 3, detector, tmp_path / "a.parquet")
    one = _one_pass(media.HAMILTON, config, 3, detector, tmp_path / "b.parquet")
    for a, b in zip(separate, one):
        assert_frame_equal(a, b)
    shots, _, frames, detections, chips = one
    assert shots.height >= 2 and detections.height > 0 and chips.height == detections.height
    assert frames["sampled"].sum() < frames.height


def test_a_cut_called_late_moves_the_sampling_of_the_frames_before_it(tmp_path, detector):
    # Cuts 5 frames apart merge: the detector calls 45 only at frame 55, when its shot's frames wait in the window.
    path = media.make_with_cuts(tmp_path, cuts=(16, 20, 40, 45, 60), frames=80)
    config = ShotConfig()
    separate = _separate(path, config, 3, detector, tmp_path / "a.parquet")
    one = _one_pass(path, config, 3, detector, tmp_path / "b.parquet")
    for a, b in zip(separate, one):
        assert_frame_equal(a, b)
    assert one[0]["start_frame"].to_list() == [0, 16, 45, 60]


def test_a_cut_behind_the_window_stops_the_pass(tmp_path, monkeypatch):
    path = media.make_with_cuts(tmp_path, cuts=(16, 20, 40, 45, 60), frames=80)
    # A window too short for a cut called 10 frames late.
    monkeypatch.setattr(ShotCutter, "lookback", property(lambda self: 5))
    scan = MovieScan(VideoReader(path, max_side=64), ShotConfig(), 3)
    with pytest.raises(CutBehindWindow, match="cut at frame 45"):
        list(scan.sampled_frames())


def test_progress_counts_every_frame(tmp_path):
    path = media.make_with_cuts(tmp_path, cuts=(16, 40), frames=64)
    seen = []
    reader = VideoReader(path, max_side=64, progress=lambda done, total: seen.append(done))
    frames = list(MovieScan(reader, ShotConfig(), 4).sampled_frames())
    assert seen == list(range(1, 65))
    # Every fourth frame from each shot's first: 0..12, 16..36, 40..60.
    assert [f.index for f, _ in frames] == [*range(0, 16, 4), *range(16, 40, 4), *range(40, 64, 4)]
    assert [s for _, s in frames] == [0] * 4 + [1] * 6 + [2] * 6


def _parallel_one_pass(path, config: ShotConfig, stride: int, detector, chips_path, workers: int = 2):
    reader = VideoReader(path, max_side=640, keep_full=True, workers=workers)
    scan = MovieScan(reader, config, stride)
    source = ((frame, shot, frame.time_s) for frame, shot in scan.sampled_frames())
    with ChipWriter(chips_path, "arcface-112") as chips:
        detections = detect_faces(source, reader, detector, chips=chips)
    tables = scan.shot_scan.shots, scan.shot_scan.frame_times, scan.frames, detections, pl.read_parquet(chips_path)
    return tables, scan.frames_decoded


def test_worker_processes_give_the_one_process_pass(tmp_path, detector, monkeypatch):
    import vcn.media.parallel as parallel

    monkeypatch.setattr(parallel, "SEGMENT_FRAMES", 50)
    assert len(parallel.plan_segments(str(media.HAMILTON)).starts) > 2
    config = ShotConfig()
    separate = _separate(media.HAMILTON, config, 3, detector, tmp_path / "a.parquet")
    tables, decoded = _parallel_one_pass(media.HAMILTON, config, 3, detector, tmp_path / "b.parquet")
    for a, b in zip(separate, tables):
        assert_frame_equal(a, b)
    assert decoded >= 275


@pytest.mark.parametrize("head_frames", [scan_module.HEAD_FRAMES, 0])
def test_worker_segments_starting_on_cuts_and_a_merged_cut_across_a_boundary(tmp_path, detector, monkeypatch, head_frames):
    # Key frames every 10 frames, so segments start on the cuts at 20, 40 and 60: their first frame's score comes
    # from the frame before, in another worker. The cut at 45 merges with 40 and is called at 55, by the next
    # segment's worker. The worker that holds frame 45 started its detector afresh at 40: it converts every frame
    # of its first shot; told to convert none of them, it samples other frames, and those are decoded again.
    import vcn.media.parallel as parallel

    monkeypatch.setattr(parallel, "SEGMENT_FRAMES", 10)
    monkeypatch.setattr(scan_module, "HEAD_FRAMES", head_frames)
    path = media.make_with_cuts(tmp_path, cuts=(16, 20, 40, 45, 60), frames=80, keyint=10)
    plan = parallel.plan_segments(str(path))
    assert plan.starts == list(range(0, 80, 10))
    config = ShotConfig()
    separate = _separate(path, config, 3, detector, tmp_path / "a.parquet")
    tables, decoded = _parallel_one_pass(path, config, 3, detector, tmp_path / "b.parquet", workers=3)
    for a, b in zip(separate, tables):
        assert_frame_equal(a, b)
    assert tables[0]["start_frame"].to_list() == [0, 16, 45, 60]
    if head_frames:
        assert decoded == 80
    else:
        assert decoded > 80  # frames its worker did not sample were decoded again


def test_the_adaptive_detector_with_workers_leaves_it_to_separate_passes(monkeypatch):
    import vcn.media.parallel as parallel

    monkeypatch.setattr(parallel, "SEGMENT_FRAMES", 50)
    scan = MovieScan(VideoReader(media.HAMILTON, max_side=64, workers=2), ShotConfig(detector="adaptive"), 3)
    with pytest.raises(OnePassUnavailable, match="adaptive shot detector runs in one process only"):
        next(scan.sampled_frames())


def test_content_scores_give_the_detector_s_cuts(tmp_path):
    from vcn.media.shots import ScoreCutter, frame_score

    path = media.make_with_cuts(tmp_path, cuts=(16, 20, 40, 45, 60), frames=80)
    frames = [f.image for f in VideoReader(path, max_side=256).frames()]
    cutter = ShotCutter(ShotConfig(), 24.0, keep_scores=True)
    for i, image in enumerate(frames):
        cutter.add(i, image)
    scores = [0.0, *cutter.scores]
    assert scores[16] == frame_score(frames[15], frames[16]) and scores[16] > 27
    replay = ScoreCutter(ShotConfig(), 24.0)
    for i, score in enumerate(scores):
        replay.add(i, score)
    assert replay.cuts == cutter.cuts == [16, 45, 60]
