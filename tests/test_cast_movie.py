"""The cast movie benchmark: its renderer's ground truth, and the scorer that matches tracks to it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import av
import numpy as np
import polars as pl
import pytest

from benchmarks.movie_quality import (
    Truth,
    box_iou,
    detection_scores,
    link_tracks,
    match_boxes,
    score_method,
    track_truths,
)
from tests.conftest import shared_path

TINY = {"people": 2, "seconds": 4, "height": 180, "seed": 3}
TINY_FACES_SHA256 = "9a313e5d45a6f535f9e1588912690c3a071104938e9349018a265a980797787b"
"""The tiny movie's ground truth (``faces``, compact JSON) as rendered before ``photos_per_appearance`` existed."""


@pytest.fixture(scope="module")
def celeba():
    return shared_path("data", "celeba-faces")


@pytest.fixture(scope="module")
def tiny_movie(celeba, tmp_path_factory):
    """A 4 s, 320x180 movie of 2 people, and its ground truth record."""
    from benchmarks.make_cast_movie import build_cast_movie

    out = build_cast_movie(tmp_path_factory.mktemp("cast") / "tiny.mp4", **TINY)
    return out, json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def tiny_mv_movie(celeba, tmp_path_factory):
    """The tiny movie with 2-4 photos per appearance, and its ground truth record."""
    from benchmarks.make_cast_movie import build_cast_movie

    out = build_cast_movie(tmp_path_factory.mktemp("cast") / "tiny_mv.mp4", **TINY, photos_per_appearance=(2, 4))
    return out, json.loads(out.with_suffix(".json").read_text())


def test_tiny_movie_has_every_frame_and_its_faces(tiny_movie):
    video, record = tiny_movie
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (320, 180)
        n_frames = sum(1 for _ in container.decode(stream))
    assert n_frames == record["frames"] == 96 == len(record["faces"])
    cast = {p["identity"] for p in record["cast"]}
    assert len(cast) == 2
    starts = [s["start_frame"] for s in record["shots"]]
    assert starts[0] == 0 and starts[1:] == record["cuts"]
    for frame, faces in enumerate(record["faces"]):
        shot = max(i for i, start in enumerate(starts) if start <= frame)
        assert 1 <= len(faces) <= 3
        assert {f["identity"] for f in faces} <= cast and len({f["identity"] for f in faces}) == len(faces)
        for face in faces:
            x1, y1, x2, y2 = face["box"]
            assert face["shot"] == shot
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 180
            # 40-200 px at 720p, scaled to 180 rows.
            assert 10 - 0.5 <= y2 - y1 <= 50 + 0.5


def test_truth_boxes_are_where_the_faces_are_pasted(tiny_movie):
    from benchmarks.make_cast_movie import Renderer, plan_movie

    _, record = tiny_movie
    plan = plan_movie(people=2, seconds=4, height=180, seed=3)
    renderer = Renderer(plan)
    for frame in range(0, plan.frames, 7):
        rgb, faces = renderer.frame(frame)
        assert faces == record["faces"][frame]  # the same seed renders the same truth
        # The same frame without its faces: same background, lighting and grain.
        shot = plan.shot_at(frame)
        bare = dataclasses.replace(shot, appearances=())
        empty = dataclasses.replace(plan, shots=tuple(bare if s.index == shot.index else s for s in plan.shots))
        background, none = Renderer(empty).frame(frame)
        assert none == []
        changed = np.abs(rgb.astype(int) - background.astype(int)).max(axis=2) > 12
        near = np.zeros_like(changed)
        for face in faces:
            x1, y1, x2, y2 = (round(v) for v in face["box"])
            inside = changed[max(y1, 0) : y2, max(x1, 0) : x2]
            assert inside.mean() > 0.6, (frame, face)  # the box is covered by the pasted face
            # The feathered ellipse reaches past the box by a fraction of its size, no further.
            w, h = x2 - x1, y2 - y1
            near[max(y1 - h, 0) : y2 + h, max(x1 - w, 0) : x2 + w] = True
            # The pasted ellipse is centred on the box (a little above: hair) and about 1.5 boxes wide and tall.
            ys, xs = np.nonzero(changed[max(y1 - h, 0) : y2 + h, max(x1 - w, 0) : x2 + w])
            ys, xs = ys + max(y1 - h, 0), xs + max(x1 - w, 0)
            assert abs(xs.mean() - (x1 + x2) / 2) < 0.1 * w and abs(ys.mean() - (y1 + y2) / 2) < 0.15 * h
            assert 1.2 * w < np.ptp(xs) < 2.2 * w and 1.2 * h < np.ptp(ys) < 2.2 * h
        assert not changed[~near].any(), frame


def test_decoded_frames_are_the_rendered_ones(tiny_movie):
    from benchmarks.make_cast_movie import Renderer, plan_movie

    video, record = tiny_movie
    renderer = Renderer(plan_movie(people=2, seconds=4, height=180, seed=3))
    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    cut = record["cuts"][0]
    # Around a cut, each decoded frame is its own rendered frame, not its neighbour across the cut.
    for frame in (0, cut - 1, cut, len(decoded) - 1):
        rendered, _ = renderer.frame(frame)
        error = np.abs(decoded[frame].astype(int) - rendered.astype(int)).mean()
        assert error < 4, (frame, error)
        across = decoded[cut] if frame < cut else decoded[cut - 1]
        assert np.abs(across.astype(int) - rendered.astype(int)).mean() > 3 * error + 5


def test_retinaface_finds_the_faces_at_the_truth_boxes(celeba):
    from benchmarks.make_cast_movie import Renderer, plan_movie
    from vcn.faces.detection import create_detector

    plan = plan_movie(people=3, seconds=20, height=720, seed=1)
    renderer = Renderer(plan)
    detector = create_detector("retinaface", max_side=None, threads=2)
    found = total = 0
    for shot in plan.shots:
        rgb, faces = renderer.frame(shot.start_frame + shot.frames // 2)
        truth = np.array([f["box"] for f in faces])
        detected = detector.detect([rgb])[0].boxes
        found += len(match_boxes(detected, truth))
        total += len(truth)
        assert len(detected) <= len(truth) + 1  # backgrounds hold no faces
    assert total >= 8 and found / total >= 0.9


# --------------------------------------------------------------------------- the scorer, on synthetic tracks


def _truth() -> Truth:
    a0, b0 = [100.0, 100.0, 140.0, 150.0], [300.0, 100.0, 340.0, 150.0]
    boxes, identities, shots = [], [], []
    for frame in range(6):
        shift = 2.0 * frame
        boxes.append(
            np.array([[a0[0] + shift, a0[1], a0[2] + shift, a0[3]], [b0[0] - shift, b0[1], b0[2] - shift, b0[3]]])
        )
        identities.append(["A", "B"])
        shots.append([0 if frame < 3 else 1] * 2)
    return Truth(boxes=boxes, identities=identities, shots=shots, cuts=[3])


def _detections(rows: list[tuple[int, list[float], int | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "frame": [f for f, _, _ in rows],
            "x1": [b[0] for _, b, _ in rows],
            "y1": [b[1] for _, b, _ in rows],
            "x2": [b[2] for _, b, _ in rows],
            "y2": [b[3] for _, b, _ in rows],
            "track_id": [t for _, _, t in rows],
        },
        schema_overrides={"track_id": pl.Int64},
    )


def test_box_iou_against_a_naive_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (9, 2))
    a = np.hstack([xy, xy + rng.uniform(1, 50, (9, 2))])
    b = np.vstack([a[:3] + 5, [[500, 500, 510, 510]]])
    got = box_iou(a, b)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
            assert got[i, j] == pytest.approx(w * h / union)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def test_match_boxes_is_one_to_one_best_first():
    truth = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)
    detected = np.array([[1, 0, 11, 10], [0, 0, 10, 10], [21, 1, 31, 11], [50, 50, 60, 60]], float)
    # Both of the first two detections overlap face 0; the exact one wins, the other matches nothing.
    assert sorted(match_boxes(detected, truth)) == [(1, 0), (2, 1)]
    assert match_boxes(detected, truth, threshold=0.99) == [(1, 0)]


def test_tracks_take_the_majority_identity_of_their_detections():
    truth = _truth()
    a = [list(truth.boxes[f][0]) for f in range(6)]
    b = [list(truth.boxes[f][1]) for f in range(6)]
    nowhere = [600.0, 400.0, 640.0, 450.0]
    detections = _detections(
        [(0, a[0], 1), (1, a[1], 1), (2, a[2], 1)]  # track 1: A on three frames
        + [(3, b[3], 2), (4, b[4], 2), (5, a[5], 2)]  # track 2: B twice, then switches to A
        + [(0, nowhere, 3), (1, nowhere, 3)]  # track 3: no face there
        + [(0, [v + 1 for v in a[0]], None)]  # an untracked duplicate of A on frame 0: loses to track 1's box
        + [(4, [v + 60 for v in b[4]], 4), (5, b[5], 4)]  # track 4: off on frame 4, B on frame 5
    )
    tracks = track_truths(detections, truth)
    assert set(tracks) == {"1", "2", "3", "4"}
    assert (tracks["1"].identity, tracks["1"].purity, tracks["1"].identities) == ("A", 1.0, 1)
    assert (tracks["2"].identity, tracks["2"].matched, tracks["2"].identities) == ("B", 3, 2)
    assert tracks["2"].purity == pytest.approx(2 / 3)
    assert tracks["3"].identity is None and tracks["3"].matched == 0 and tracks["3"].purity == 0.0
    assert (tracks["4"].identity, tracks["4"].purity) == ("B", 0.5)

    scores = score_method(tracks, {"1": "x", "2": "y", "3": "z", "4": None}, truth, detections)
    assert (scores["tracks"], scores["identified_tracks"], scores["false_tracks"]) == (4, 3, 1)
    assert scores["tracks_with_identity_switch"] == 1
    # Identified tracks: 1 (A) in x, 2 (B) in y, 4 (B) Unknown. Every cluster is pure; B is split in two.
    assert scores["wcp"] == 1.0 and scores["n_clusters"] == 2 and scores["pcr"] == 1.0
    assert scores["n_unknown"] == 1 and scores["bcubed_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert scores["clusters_by_identity"] == {"A": {"x": 1}, "B": {"y": 1, "Unknown": 1}}
    # Detection-weighted purity over identified tracks: (3 + 2 + 1) of 3 + 3 + 2 detections.
    assert scores["track_purity"] == pytest.approx(6 / 8)
    # Appearances (shot, identity): (0, A), (1, A), (1, B) tracked; (0, B) never.
    assert (scores["appearances"], scores["appearances_covered"]) == (4, 3)
    with pytest.raises(ValueError, match="no cluster row"):
        score_method(tracks, {"1": "x", "2": "y"}, truth, detections)


def test_detection_recall_and_precision_count_the_frames_the_detector_ran_on():
    truth = _truth()
    detections = _detections(
        [(0, list(truth.boxes[0][0]), 1), (0, [600.0, 400.0, 640.0, 450.0], 2), (2, list(truth.boxes[2][1]), 3)]
        + [(1, list(truth.boxes[1][0]), 4)]  # frame 1 is not among the detector's frames: ignored
    )
    scores = detection_scores(detections, [0, 2, 4], truth)
    assert (scores["frames"], scores["faces"], scores["detections"], scores["matched"]) == (3, 6, 3, 2)
    assert scores["recall"] == pytest.approx(2 / 6) and scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall_by_face_height"]["0-60"] == {"faces": 6, "recall": pytest.approx(2 / 6)}
    assert scores["recall_by_face_height"]["100-1000"] == {"faces": 0, "recall": None}


def test_greedy_tracker_links_within_a_shot_only():
    frames = [0, 5, 10, 15]
    face = np.array([[100, 100, 140, 150]], float)
    boxes = [face, face + 3, np.vstack([face + 6, face + 200]), face + 9]
    ids = link_tracks(frames, boxes, {0: 0, 5: 0, 10: 0, 15: 1})
    assert [i.tolist() for i in ids] == [[0], [0], [0, 1], [2]]  # the cut at frame 15 starts a new track
    # A jump too far for IoU 0.3 starts a new track too.
    ids = link_tracks([0, 5], [face, face + 30], {0: 0, 5: 0})
    assert [i.tolist() for i in ids] == [[0], [1]]


def test_embedding_spread_compares_crops_within_tracks_and_tracks_between_people(tmp_path):
    from benchmarks.movie_quality import MOVIE_ID, TrackTruth, embedding_spread

    folder = tmp_path / "artifacts" / "movies" / MOVIE_ID
    folder.mkdir(parents=True)
    angles = {0: [0.0, 0.02], 1: [0.3, 0.32], 2: [1.2, 1.2], 9: [2.0, 2.5]}  # track 9: a false track
    rows = [(t, a) for t, pair in angles.items() for a in pair]
    pl.DataFrame({"track_id": [t for t, _ in rows], "model_version": ["m"] * len(rows)}).write_parquet(
        folder / "crop_embeddings.parquet"
    )
    np.save(folder / "crop_embeddings.npy", np.array([[np.cos(a), np.sin(a)] for _, a in rows], np.float32))
    person = {"0": "A", "1": "A", "2": "B", "9": None}
    tracks = {
        t: TrackTruth(identity=p, detections=2, matched=2 if p else 0, purity=1.0, identities=1)
        for t, p in person.items()
    }
    spread = embedding_spread(tmp_path, tracks)
    assert spread["model_version"] == "m"
    # Within tracks: 1 - cos(0.02) twice and 0 once; median 1 - cos(0.02).
    assert spread["within_track"] == pytest.approx(1 - np.cos(0.02), abs=1e-6)
    assert spread["same_person"] == pytest.approx(1 - np.cos(0.3), abs=1e-6)
    assert spread["different_people"] == pytest.approx(np.median([1 - np.cos(1.19), 1 - np.cos(0.89)]), abs=1e-6)


def test_default_movie_is_the_one_rendered_before_photos_per_appearance(tiny_movie):
    _, record = tiny_movie
    faces = json.dumps(record["faces"], separators=(",", ":")).encode()
    assert hashlib.sha256(faces).hexdigest() == TINY_FACES_SHA256
    assert record["photos_per_appearance"] == [1, 1]
    assert all(len(a["photos"]) == 1 and a["fades"] == [] for s in record["shots"] for a in s["appearances"])


def test_photos_per_appearance_changes_the_photos_and_nothing_else(celeba):
    from benchmarks.make_cast_movie import plan_movie

    def without_photos(plan):
        shots = tuple(
            dataclasses.replace(
                s, appearances=tuple(dataclasses.replace(a, photos=(), fades=()) for a in s.appearances)
            )
            for s in plan.shots
        )
        return dataclasses.replace(plan, photos_per_appearance=(1, 1), shots=shots)

    one = plan_movie(**TINY)
    assert plan_movie(**TINY, photos_per_appearance=(1, 1)) == one
    several = plan_movie(**TINY, photos_per_appearance=(2, 4))
    assert several.photos_per_appearance == (2, 4)
    # The same edit, people, paths, looks and backgrounds; only the photos and their fades differ.
    assert without_photos(several) == without_photos(one)
    assert any(len(a.photos) > 1 for s in several.shots for a in s.appearances)
    for bad in ((0, 2), (3, 2)):
        with pytest.raises(ValueError, match="photos_per_appearance"):
            plan_movie(**TINY, photos_per_appearance=bad)


def test_photo_at_steps_through_the_photos_and_eases_across_each_fade():
    from benchmarks.make_cast_movie import Appearance

    a = Appearance(
        identity="A",
        photos=("p", "q", "r"),
        fades=((10, 4), (20, 3)),
        mirrored=False,
        rotation=0.0,
        blur=0.0,
        colour=(1.0, 1.0, 1.0),
        start=(0.0, 0.0),
        end=(0.0, 0.0),
        heights=(50.0, 50.0),
        bob=0.0,
        bob_period=24.0,
        phase=0.0,
    )
    photos, weights = zip(*(a.photo_at(k) for k in range(30)))
    assert photos == (0,) * 14 + (1,) * 9 + (2,) * 7
    assert weights[:10] == (0.0,) * 10 and weights[14:20] == (0.0,) * 6 and weights[23:] == (0.0,) * 7
    fade = weights[10:14]
    assert all(0 < w < 1 for w in fade) and list(fade) == sorted(fade) and fade[1] + fade[2] == pytest.approx(1)
    assert 0 < weights[20] < weights[21] < weights[22] < 1


def test_several_photos_per_appearance_change_the_face_at_the_box_not_its_identity(tiny_mv_movie):
    from benchmarks.make_cast_movie import Renderer, plan_movie

    video, record = tiny_mv_movie
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == record["frames"]
    assert record["photos_per_appearance"] == [2, 4]
    photos_of = {p["identity"]: set(p["photos"]) for p in record["cast"]}
    fades = 0
    for shot in record["shots"]:
        start, stop = shot["start_frame"], shot["start_frame"] + shot["frames"]
        identities = [a["identity"] for a in shot["appearances"]]
        # One face per appearance on every frame of the shot, in its order: the identity never changes.
        assert all([f["identity"] for f in faces] == identities for faces in record["faces"][start:stop])
        for a in shot["appearances"]:
            assert len(set(a["photos"])) == len(a["photos"]) == len(a["fades"]) + 1
            assert set(a["photos"]) <= photos_of[a["identity"]]
            fades += len(a["fades"])
    assert fades >= 2

    # The box moves smoothly across the fades, as a tracker needs to keep one track.
    for previous, faces in zip(record["faces"], record["faces"][1:]):
        for p, f in zip(previous, faces):
            if p["shot"] == f["shot"]:
                assert box_iou(np.array([p["box"]]), np.array([f["box"]]))[0, 0] > 0.9

    # Around each fade, compare with the same movie showing one photo in that appearance throughout: up to the
    # fade the frame is the one of the photo before it, half way the face at the box is the mix of both photos
    # (without the background showing through), after it another face is at the box.
    plan = plan_movie(**TINY, photos_per_appearance=(2, 4))
    renderer = Renderer(plan)

    def showing_only(shot, appearance, photo):
        still = dataclasses.replace(appearance, photos=(photo,), fades=())
        changed = dataclasses.replace(
            shot, appearances=tuple(still if b is appearance else b for b in shot.appearances)
        )
        return Renderer(dataclasses.replace(plan, shots=tuple(changed if s is shot else s for s in plan.shots)))

    for shot in plan.shots:
        for i, a in enumerate(shot.appearances):
            for j, (first, frames) in enumerate(a.fades):
                old, new = showing_only(shot, a, a.photos[j]), showing_only(shot, a, a.photos[j + 1])
                before = shot.start_frame + first - 1
                rgb, faces = renderer.frame(before)
                ref, ref_faces = old.frame(before)
                assert np.array_equal(rgb, ref) and faces == ref_faces

                middle = shot.start_frame + first + frames // 2
                _, weight = a.photo_at(middle - shot.start_frame)
                rgb, faces = renderer.frame(middle)
                x1, y1, x2, y2 = (round(v) for v in faces[i]["box"])
                mix = (1 - weight) * old.frame(middle)[0] + weight * new.frame(middle)[0]
                assert 0.2 < weight < 0.8 and np.abs(rgb - mix)[y1:y2, x1:x2].mean() < 2, (shot.index, i, j)

                after = shot.start_frame + first + frames
                rgb, faces = renderer.frame(after)
                ref, ref_faces = old.frame(after)
                x1, y1, x2, y2 = (round(v) for v in ref_faces[i]["box"])
                assert faces[i]["identity"] == a.identity
                assert np.abs(rgb.astype(int) - ref.astype(int))[y1:y2, x1:x2].mean() > 10, (shot.index, i, j)
