"""Track datasets (format v1): reading, on-screen pairs, predictions, loose-crop alignment.

Small datasets are built in ``tmp_path``; the real faces are loose crops cut
around RetinaFace detections in tests/data/hamilton_clip.mp4, as a track
dataset ships them (face centred, crop side twice the face box).
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import av
import cv2
import numpy as np
import polars as pl
import pytest

from tests.conftest import HAMILTON, shared_path
from vcn.clustering.cannot_link import on_screen_together, positions_on_screen_together
from vcn.errors import VcnError
from vcn.faces.align import estimate_similarity, get_template, landmarks_after_alignment
from vcn.faces.detection.base import Detections
from vcn.faces.detection.retinaface import RetinaFaceDetector
from vcn.faces.loose_crops import AlignedCrops, align_loose_crops
from vcn.formats.trackset import (
    Labels,
    TrackProblem,
    TracksetError,
    read_labels,
    read_predictions,
    read_trackset,
    read_trackset_labels,
    write_predictions,
)

#: Frames of the clip with faces of 40-240 px: singer, speaker close-ups, audience.
FACE_FRAMES = (40, 100, 150, 200, 240)


# ---------------------------------------------------------------- helpers


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def _write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    path.write_bytes(data.tobytes())


def _make_trackset(root: Path, tracks: list[str], crops: list[str], image: np.ndarray | None = None) -> Path:
    """A dataset with the given CSV rows; every crop path gets ``image`` (grey by default)."""
    root.mkdir(parents=True, exist_ok=True)
    _write_csv(root / "tracks.csv", "track_id,shot_id,start_frame,end_frame", tracks)
    _write_csv(root / "crops.csv", "track_id,frame,path", crops)
    picture = np.full((64, 64, 3), 128, np.uint8) if image is None else image
    for row in crops:
        relative = row.split(",")[2]
        if not relative.startswith("/") and ".." not in relative:
            _write_image(root / relative, picture)
    return root


VALID_TRACKS = ["007,01,10,20", "t1,01,15,30", "t2,02,40,40"]
VALID_CROPS = [
    "007,10,crops/007/10.jpg",
    "007,20,crops/007/20.png",
    "t1,15,crops/t1/15.jpg",
    "t2,40,crops/t2/40.jpg",
]


@pytest.fixture
def valid(tmp_path) -> Path:
    return _make_trackset(tmp_path / "ep", VALID_TRACKS, VALID_CROPS)


# ---------------------------------------------------------------- reading


def test_a_valid_trackset_reads_with_string_ids(valid):
    trackset = read_trackset(valid)
    assert trackset.root == valid
    assert trackset.tracks.schema == pl.Schema(
        {"track_id": pl.String, "shot_id": pl.String, "start_frame": pl.Int64, "end_frame": pl.Int64}
    )
    assert trackset.crops.schema == pl.Schema({"track_id": pl.String, "frame": pl.Int64, "path": pl.String})
    assert trackset.tracks["track_id"].to_list() == ["007", "t1", "t2"]
    assert trackset.tracks["shot_id"].to_list() == ["01", "01", "02"]
    assert trackset.tracks.row(0) == ("007", "01", 10, 20)
    assert trackset.crops["path"].to_list() == [row.split(",")[2] for row in VALID_CROPS]
    assert trackset.crops["frame"].to_list() == [10, 20, 15, 40]
    assert trackset.problems == []
    assert trackset.has_labels is False
    assert trackset.crop_paths()[0] == valid / "crops/007/10.jpg"


def test_labels_csv_is_noted_but_never_read(valid):
    # Not UTF-8, not CSV, wrong columns: read_trackset must not care.
    (valid / "labels.csv").write_bytes(b"\xff\xfe garbage\x00\nno,columns,here\n")
    trackset = read_trackset(valid)
    assert trackset.has_labels is True
    assert trackset.tracks.height == 3
    with pytest.raises(TracksetError, match="labels.csv"):
        read_trackset_labels(valid)


def test_labels_read_separately(valid):
    _write_csv(valid / "labels.csv", "track_id,identity", ["007,alice", "t1,0042"])
    assert read_trackset_labels(valid) == {"007": "alice", "t1": "0042"}
    _write_csv(valid / "labels.csv", "track_id,identity", ["007,alice", "007,bob"])
    with pytest.raises(TracksetError, match=r"labels\.csv, line 3: duplicate track_id '007' \(first on line 2\)"):
        read_trackset_labels(valid)


def test_labels_and_predictions_read_as_written(tmp_path):
    labels = tmp_path / "truth.csv"
    labels.write_text("track_id,identity,note\n007,Alice,x\n\n10,Bob,\n", encoding="utf-8")
    assert read_labels(labels) == Labels({"007": "Alice", "10": "Bob"}, {"007": 2, "10": 4})
    pred = tmp_path / "pred.csv"
    write_predictions(pred, ["007", "10", "99"], ["01", None, 2])
    assert read_predictions(pred) == {"007": "01", "10": None, "99": "2"}
    pred.write_text("track_id,cluster\n007,1\n007,2\n", encoding="utf-8")
    with pytest.raises(TracksetError, match=r"pred\.csv, line 3: duplicate track_id '007' \(first on line 2\)"):
        read_predictions(pred)


def test_header_only_crops_leaves_every_track_without_crops(valid):
    _write_csv(valid / "crops.csv", "track_id,frame,path", [])
    trackset = read_trackset(valid)
    assert trackset.crops.height == 0
    assert trackset.problems == [TrackProblem(t, "no crops in crops.csv") for t in ("007", "t1", "t2")]


def test_extra_columns_blank_lines_and_a_bom_are_accepted(valid):
    (valid / "tracks.csv").write_text(
        "\ufefftrack_id,shot_id,start_frame,end_frame,note\n007,01,10,20,x\n\nt1,01,15,30,y\nt2,02,40,40,z\n",
        encoding="utf-8",
    )
    assert read_trackset(valid).tracks["track_id"].to_list() == ["007", "t1", "t2"]


def _replace(name: str, header: str, rows: list[str]):
    return lambda root: _write_csv(root / name, header, rows)


TRACKS_HEADER = "track_id,shot_id,start_frame,end_frame"
CROPS_HEADER = "track_id,frame,path"

ERROR_CASES = {
    "missing tracks.csv": (lambda root: (root / "tracks.csv").unlink(), "tracks.csv", None, "file not found"),
    "missing crops.csv": (lambda root: (root / "crops.csv").unlink(), "crops.csv", None, "file not found"),
    "missing column": (
        _replace("tracks.csv", "track_id,shot,start_frame,end_frame", VALID_TRACKS),
        "tracks.csv",
        1,
        "missing column(s) shot_id; found columns: track_id, shot, start_frame, end_frame",
    ),
    "empty tracks.csv": (lambda root: (root / "tracks.csv").write_bytes(b""), "tracks.csv", None, "empty file"),
    "empty crops.csv": (lambda root: (root / "crops.csv").write_bytes(b""), "crops.csv", None, "empty file"),
    "no tracks": (_replace("tracks.csv", TRACKS_HEADER, []), "tracks.csv", None, "no tracks"),
    "non-integer start": (
        _replace("tracks.csv", TRACKS_HEADER, ["007,01,10,20", "t1,01,15.0,30"]),
        "tracks.csv",
        3,
        "start_frame must be an integer, got '15.0'",
    ),
    "non-integer crop frame": (
        _replace("crops.csv", CROPS_HEADER, ["007,10,crops/007/10.jpg", "007,ten,crops/007/20.png"]),
        "crops.csv",
        3,
        "frame must be an integer, got 'ten'",
    ),
    "start after end": (
        _replace("tracks.csv", TRACKS_HEADER, ["007,01,10,20", "t1,01,31,30"]),
        "tracks.csv",
        3,
        "start_frame 31 > end_frame 30",
    ),
    "duplicate track": (
        _replace("tracks.csv", TRACKS_HEADER, ["007,01,10,20", "t1,01,15,30", "007,02,1,2"]),
        "tracks.csv",
        4,
        "duplicate track_id '007' (first on line 2)",
    ),
    "duplicate crop": (
        _replace(
            "crops.csv", CROPS_HEADER, ["007,10,crops/007/10.jpg", "t1,15,crops/t1/15.jpg", "007,10,crops/007/20.png"]
        ),
        "crops.csv",
        4,
        "duplicate crop: track '007' frame 10 (first on line 2)",
    ),
    "unknown track": (
        _replace("crops.csv", CROPS_HEADER, ["007,10,crops/007/10.jpg", "t9,15,crops/t1/15.jpg"]),
        "crops.csv",
        3,
        "track_id 't9' is not in tracks.csv",
    ),
    "absolute path": (
        _replace("crops.csv", CROPS_HEADER, ["007,10,/etc/passwd"]),
        "crops.csv",
        2,
        "is absolute",
    ),
    "escaping path": (
        _replace("crops.csv", CROPS_HEADER, ["007,10,crops/007/10.jpg", "t1,15,crops/../../t1.jpg"]),
        "crops.csv",
        3,
        "leaves the dataset folder",
    ),
    "wrong field count": (
        _replace("tracks.csv", TRACKS_HEADER, ["007,01,10,20", "t1,01,15"]),
        "tracks.csv",
        3,
        "expected 4 fields, got 3",
    ),
    "empty id": (
        _replace("tracks.csv", TRACKS_HEADER, ["007,01,10,20", ",01,15,30"]),
        "tracks.csv",
        3,
        "empty track_id",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_bad_files_raise_naming_file_and_line(valid, case):
    corrupt, file_name, line, message = ERROR_CASES[case]
    corrupt(valid)
    with pytest.raises(TracksetError) as caught:
        read_trackset(valid)
    error = caught.value
    assert isinstance(error, VcnError) and isinstance(error, ValueError)
    assert error.path == str(valid / file_name)
    assert error.line == line
    assert message in error.reason
    location = str(valid / file_name) if line is None else f"{valid / file_name}, line {line}"
    assert str(error).startswith(f"{location}: ")


def test_missing_folder_raises(tmp_path):
    with pytest.raises(TracksetError, match="does not exist"):
        read_trackset(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TracksetError, match="not a folder"):
        read_trackset(tmp_path / "file")


def test_per_track_problems_are_recorded_not_raised(tmp_path):
    root = _make_trackset(
        tmp_path / "ep",
        ["a,s,10,20", "b,s,10,20", "c,s,10,20", "d,s,10,20", "ok,s,10,20"],
        ["a,10,crops/a.jpg", "c,9,crops/c9.jpg", "c,21,crops/c21.jpg", "d,10,crops/d.jpg", "ok,20,crops/ok.jpg"],
    )
    (root / "crops/a.jpg").unlink()
    trackset = read_trackset(root)
    assert trackset.problems == [
        TrackProblem("a", "crops.csv line 2: crop file crops/a.jpg does not exist"),
        TrackProblem("b", "no crops in crops.csv"),
        TrackProblem("c", "crops.csv line 3: crop frame 9 is before the track's start_frame 10"),
        TrackProblem("c", "crops.csv line 4: crop frame 21 is after the track's end_frame 20"),
    ]
    assert trackset.problem_track_ids == {"a", "b", "c"}
    # The table keeps every row: nothing is silently dropped.
    assert trackset.crops.height == 5


# ---------------------------------------------------------------- on screen together


def _naive_pairs(tracks: pl.DataFrame) -> list[tuple[int, int]]:
    rows = tracks.select("shot_id", "start_frame", "end_frame").rows()
    return [
        (i, j)
        for i, j in itertools.combinations(range(len(rows)), 2)
        if rows[i][0] == rows[j][0] and rows[i][1] <= rows[j][2] and rows[j][1] <= rows[i][2]
    ]


def test_on_screen_together_by_hand():
    tracks = pl.DataFrame(
        {
            "shot_id": ["s1", "s1", "s1", "s2", "s2", "s1", "s3"],
            "start_frame": [10, 30, 15, 10, 21, 20, 0],
            "end_frame": [20, 40, 16, 20, 25, 30, 100],
        }
    )
    # 0-2 nested, 0-5 and 1-5 touch at one frame (inclusive); 3 and 4 share a
    # shot but not frames; 6 is alone; 0 and 3 share frames but not a shot.
    assert on_screen_together(tracks).tolist() == [[0, 2], [0, 5], [1, 5]]
    assert on_screen_together(tracks).dtype == np.int64
    assert on_screen_together(tracks[:1]).shape == (0, 2)


def test_pairs_on_screen_together_as_positions_in_another_order():
    tracks = pl.DataFrame(
        {"track_id": [5, 6, 7, 8], "shot_id": ["s", "s", "s", "t"], "start_frame": [0, 5, 50, 0], "end_frame": [10, 9, 60, 10]}
    )
    # Tracks 5 and 6 overlap; 9 is not in `tracks`, 7 and 8 overlap nothing of their shot.
    assert positions_on_screen_together(tracks, np.array([9, 6, 8, 5])).tolist() == [[3, 1]]
    assert positions_on_screen_together(tracks, np.array([6, 7])).shape == (0, 2)


def test_on_screen_together_matches_a_naive_reference():
    rng = np.random.default_rng(7)
    starts = rng.integers(0, 500, 300)
    tracks = pl.DataFrame(
        {
            "shot_id": rng.choice(["007", "7", "a", "b", "c"], 300),
            "start_frame": starts,
            "end_frame": starts + rng.integers(0, 60, 300),
        }
    )
    pairs = on_screen_together(tracks)
    assert [tuple(pair) for pair in pairs.tolist()] == _naive_pairs(tracks)
    assert len(pairs) > 100


# ---------------------------------------------------------------- predictions


def test_predictions_round_trip(tmp_path):
    path = tmp_path / "out" / "pred.csv"
    write_predictions(path, ["007", "t1", "t2", "t3"], [3, None, "x", float("nan")])
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    assert rows == [["track_id", "cluster"], ["007", "3"], ["t1", ""], ["t2", "x"], ["t3", ""]]
    # Overwrites in place, leaving no temporary file behind.
    write_predictions(path, ["007"], [None])
    assert path.read_text() == "track_id,cluster\n007,\n"
    assert [p.name for p in path.parent.iterdir()] == ["pred.csv"]


def test_predictions_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 track ids but 1 clusters"):
        write_predictions(tmp_path / "p.csv", ["a", "b"], [1])
    with pytest.raises(ValueError, match="duplicate track id 'a'"):
        write_predictions(tmp_path / "p.csv", ["a", "a"], [1, 2])
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- loose crops


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return RetinaFaceDetector(score_threshold=0.5, max_side=None, threads=2)


@pytest.fixture(scope="module")
def face_crops() -> list[np.ndarray]:
    """Loose crops of the clip's faces of 40 px and more: centred, side twice the box."""
    with av.open(str(HAMILTON)) as container:
        frames = {}
        for index, frame in enumerate(container.decode(video=0)):
            if index in FACE_FRAMES:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= max(FACE_FRAMES):
                break
    found = RetinaFaceDetector(threads=2).detect([frames[i] for i in FACE_FRAMES])
    crops = []
    for frame, faces in zip((frames[i] for i in FACE_FRAMES), found):
        for x1, y1, x2, y2 in faces.boxes:
            side = math.sqrt((x2 - x1) * (y2 - y1))
            if side < 40:
                continue
            half = round(side)  # crop side = 2 x box side
            cx, cy = round((x1 + x2) / 2), round((y1 + y2) / 2)
            padded = cv2.copyMakeBorder(frame, half, half, half, half, cv2.BORDER_CONSTANT)
            crops.append(padded[cy : cy + 2 * half, cx : cx + 2 * half].copy())
    assert len(crops) >= 8
    return crops


def _face_trackset(root: Path, face_crops: list[np.ndarray]) -> Path:
    """Track ``f`` holds every real face (JPEG, PNG, grey PNG, RGBA PNG)."""
    crops = []
    for i, crop in enumerate(face_crops):
        if i % 4 == 0:
            path, image = f"crops/f/{i}.jpg", crop
        elif i % 4 == 1:
            path, image = f"crops/f/{i}.png", crop
        elif i % 4 == 2:
            path, image = f"crops/f/{i}.png", None
            grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
            (root / "crops/f").mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(cv2.imencode(".png", grey)[1].tobytes())
        else:
            path, image = f"crops/f/{i}.png", None
            rgba = np.dstack([crop[..., ::-1], np.full(crop.shape[:2], 255, np.uint8)])
            (root / "crops/f").mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(cv2.imencode(".png", rgba)[1].tobytes())
        if image is not None:
            _write_image(root / path, image)
        crops.append(f"f,{i},{path}")
    _write_csv(root / "tracks.csv", TRACKS_HEADER, [f"f,s,0,{len(face_crops)}"])
    _write_csv(root / "crops.csv", CROPS_HEADER, crops)
    # Grey and RGBA files really are one and four channels on disk.
    assert cv2.imread(str(root / "crops/f/2.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert cv2.imread(str(root / "crops/f/3.png"), cv2.IMREAD_UNCHANGED).shape[2] == 4
    return root


@pytest.mark.parametrize("template_name", ["arcface-112", "dlib-150"])
def test_real_faces_are_detected_and_aligned(tmp_path, face_crops, detector, template_name):
    root = _face_trackset(tmp_path / "ep", face_crops)
    seen = []
    aligned = align_loose_crops(
        read_trackset(root), template_name, detector=detector, batch_size=3, progress=lambda *a: seen.append(a)
    )
    size = get_template(template_name).size
    assert isinstance(aligned, AlignedCrops) and aligned.template == template_name
    assert aligned.problems == []
    assert aligned.table.columns == ["track_id", "frame", "path", "face_found", "score", "method"]
    assert aligned.table["frame"].to_list() == list(range(len(face_crops)))
    assert aligned.table["method"].to_list() == ["detected"] * len(face_crops)
    assert aligned.table["face_found"].all()
    assert (aligned.table["score"] >= 0.5).all() and aligned.table["score"].median() > 0.95
    assert aligned.chips.shape == (len(face_crops), size, size, 3) and aligned.chips.dtype == np.uint8
    assert seen[-1] == (len(face_crops), len(face_crops))
    # The face is the centred one: eyes in the crop's middle band, left of right.
    for crop, points in zip(face_crops, aligned.landmarks):
        relative = points / crop.shape[1::-1]
        assert np.all((relative > 0.2) & (relative < 0.8))
        assert relative[0, 0] < relative[1, 0]
    # Each chip holds the face the landmarks were taken from: detected again
    # inside a border, its landmarks are where the alignment carried the crop's.
    template = get_template(template_name)
    pad = size // 2
    framed = [cv2.copyMakeBorder(chip, pad, pad, pad, pad, cv2.BORDER_CONSTANT) for chip in aligned.chips]
    errors = []
    for points, faces in zip(aligned.landmarks, detector.detect(framed)):
        expected = landmarks_after_alignment(points, estimate_similarity(points, template.points))
        confident = faces.landmarks[faces.scores > 0.9] - pad
        if len(confident):
            errors.append(np.linalg.norm(confident - expected, axis=2).mean(axis=1).min() / size)
    # Dark and profile chips are hard to find again; the ones found agree.
    assert len(errors) >= len(framed) // 2
    assert np.median(errors) < 0.03, errors


class _GreenDotDetector:
    """Finds five green dots and reports their centroids as landmarks.

    An independent check of the geometry around the detector: where the dots
    are in the crop is known, so resizing and letterboxing must be undone
    exactly. The box is the dots' bounding box grown to the size a face with
    such landmarks would have.
    """

    name = "green-dots"

    def detect(self, images):
        results = []
        for image in images:
            rgb = image.astype(np.float64)
            greenness = (rgb[..., 1] - rgb[..., 0] - rgb[..., 2]).clip(min=0)
            count, labels = cv2.connectedComponents((greenness > 0).astype(np.uint8))
            ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
            points = []
            for label in range(1, count):
                weight = greenness * (labels == label)
                points.append([(xs * weight).sum() / weight.sum(), (ys * weight).sum() / weight.sum()])
            points = np.array(sorted(points, key=lambda p: (round(p[1] / 8), p[0])), dtype=np.float32)
            assert points.shape == (5, 2), points.shape
            centre, side = points.mean(axis=0), 2.5 * np.ptp(points[:, 0])
            box = np.concatenate([centre - side / 2, centre + side / 2])[None].astype(np.float32)
            results.append(Detections(box, np.array([0.99], np.float32), points[None]))
        return results


@pytest.mark.parametrize("height, width", [(100, 100), (90, 60), (200, 300), (41, 40)])
def test_landmarks_map_back_through_resizing_and_letterboxing(tmp_path, height, width):
    # Dots where a centred face's eyes, nose and mouth corners would be.
    layout = np.array([[0.4, 0.42], [0.6, 0.42], [0.5, 0.52], [0.42, 0.62], [0.58, 0.62]])
    image = np.zeros((height, width, 3), np.uint8)
    radius = max(1.0, 0.02 * min(height, width))
    ys, xs = np.mgrid[:height, :width]
    truth = []
    for x, y in layout * [width, height]:
        dot = (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
        image[dot] = (0, 255, 0)
        truth.append([xs[dot].mean(), ys[dot].mean()])  # the centroid as drawn on the pixel grid
    root = _make_trackset(tmp_path / "ep", ["t,s,0,0"], ["t,0,crops/dots.png"], image=image)
    aligned = align_loose_crops(read_trackset(root), "arcface-112", detector=_GreenDotDetector(), retry_size=None)
    assert aligned.table["method"].to_list() == ["detected"]
    # A tenth of a pixel: a half-pixel slip in the resize mapping would be 0.2-0.3 px.
    np.testing.assert_allclose(aligned.landmarks[0], truth, atol=0.1)


def test_a_real_face_enlarged_gives_the_same_landmarks(tmp_path, face_crops, detector):
    crop = face_crops[4]
    side = crop.shape[0]
    big = cv2.resize(crop, (2 * side, 2 * side), interpolation=cv2.INTER_CUBIC)
    root = tmp_path / "ep"
    _write_image(root / "crops/square.png", crop)
    _write_image(root / "crops/big.png", big)
    _write_csv(root / "tracks.csv", TRACKS_HEADER, ["t,s,0,1"])
    _write_csv(root / "crops.csv", CROPS_HEADER, ["t,0,crops/square.png", "t,1,crops/big.png"])
    aligned = align_loose_crops(read_trackset(root), "arcface-112", detector=detector)
    assert aligned.table["method"].to_list() == ["detected"] * 2
    assert (aligned.table["score"] > 0.99).all()
    square, big_points = aligned.landmarks
    # Pixel centres: x in the 2x image is 2 x + 0.5.
    np.testing.assert_allclose((big_points + 0.5) / 2 - 0.5, square, atol=0.005 * side)


def test_noise_falls_back_to_track_median_then_centre_prior(tmp_path, face_crops, detector):
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    root = tmp_path / "ep"
    _write_image(root / "crops/face0.png", face_crops[1])
    _write_image(root / "crops/face1.png", face_crops[2])
    _write_image(root / "crops/noise.png", noise)
    _write_csv(root / "tracks.csv", TRACKS_HEADER, ["mixed,s,0,9", "noisy,s,0,9"])
    _write_csv(
        root / "crops.csv",
        CROPS_HEADER,
        ["mixed,0,crops/face0.png", "mixed,1,crops/noise.png", "mixed,2,crops/face1.png", "noisy,0,crops/noise.png"],
    )
    aligned = align_loose_crops(read_trackset(root), "dlib-150", detector=detector)
    assert aligned.problems == []
    assert aligned.table["method"].to_list() == ["detected", "track_median", "detected", "centre_prior"]
    assert aligned.table["face_found"].to_list() == [True, False, True, False]
    assert np.isnan(aligned.table["score"][1]) and np.isnan(aligned.table["score"][3])
    assert aligned.method_counts() == {"detected": 2, "track_median": 1, "centre_prior": 1}
    # track_median: the median of the two faces' crop-relative landmarks, on the 96 px noise.
    relative = [aligned.landmarks[row] / face_crops[crop].shape[1::-1] for row, crop in ((0, 1), (2, 2))]
    np.testing.assert_allclose(aligned.landmarks[1], np.median(relative, axis=0) * 96, atol=1e-3)
    # centre_prior: a face centred in the crop, eyes above the mouth, box half the crop.
    prior = aligned.landmarks[3]
    assert abs(prior[:, 0].mean() - 48) < 1 and prior[0, 1] < prior[3, 1]
    assert 0.3 * 48 < prior[1, 0] - prior[0, 0] < 0.5 * 48
    assert aligned.chips.shape == (4, 150, 150, 3)


def test_unreadable_images_are_reported_and_skipped(tmp_path, face_crops, detector):
    root = tmp_path / "ep"
    _write_image(root / "crops/good.jpg", face_crops[1])
    (root / "crops/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "crops/empty.png").write_bytes(b"")
    _write_csv(root / "tracks.csv", TRACKS_HEADER, ["a,s,0,9", "b,s,0,9", "gone,s,0,9"])
    _write_csv(
        root / "crops.csv",
        CROPS_HEADER,
        [
            "a,0,crops/good.jpg",
            "a,1,crops/corrupt.jpg",
            "b,0,crops/corrupt.jpg",
            "b,1,crops/empty.png",
            "gone,0,crops/x.jpg",
        ],
    )
    trackset = read_trackset(root)
    assert trackset.problem_track_ids == {"gone"}  # a missing file is found on reading
    aligned = align_loose_crops(trackset, "arcface-112", detector=detector)
    assert aligned.table.select("track_id", "frame").rows() == [("a", 0)]
    assert aligned.chips.shape == (1, 112, 112, 3)
    assert aligned.problems == [
        TrackProblem("a", "crop file crops/corrupt.jpg is not a readable image; skipped"),
        TrackProblem("b", "crop file crops/corrupt.jpg is not a readable image; skipped"),
        TrackProblem("b", "crop file crops/empty.png is not a readable image; skipped"),
        TrackProblem("b", "no readable crop image"),
    ]


def test_a_tiny_crop_still_aligns(tmp_path, detector):
    root = _make_trackset(
        tmp_path / "ep", ["t,s,0,0"], ["t,0,crops/tiny.png"], image=np.full((3, 4, 3), 90, np.uint8)
    )
    aligned = align_loose_crops(read_trackset(root), "arcface-112", detector=detector)
    assert aligned.table["method"].to_list() == ["centre_prior"]
    assert aligned.chips.shape == (1, 112, 112, 3)


# ---------------------------------------------------------------- the shared dev episode


def test_dev_episode_reads_cleanly():
    root = shared_path("data", "tracksets", "dev-ep")
    trackset = read_trackset(root)
    assert trackset.tracks.height == 600
    assert trackset.crops.height == 6785
    assert trackset.problems == []
    assert trackset.has_labels
    assert len(read_trackset_labels(root)) == 600
