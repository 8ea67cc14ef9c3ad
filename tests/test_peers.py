"""The peer baselines as their users run them (benchmarks/peers.py).

The faces are loose crops cut from the bundled Hamilton clip around boxes
that face_recognition's HOG detector found in the whole frames: the performer
in frames 0 (small), 90 and 105, someone in the audience in frame 240. The reference for a crop's
descriptor is face_recognition's own one-liner, ``face_encodings(image)``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from benchmarks import peers
from benchmarks.baselines import BASELINES, Baseline
from benchmarks.peers import TrackDescriptors, crop_descriptor, face_recognition_descriptors, peer_rows, track_means
from tests.conftest import HAMILTON
from vcn.formats.trackset import TracksetError

face_recognition = pytest.importorskip("face_recognition", reason="face_recognition is the chain under test")

#: (top, right, bottom, left) of the face HOG finds in the whole frame, per frame of the clip.
FACE_BOXES = {0: (49, 567, 101, 515), 90: (76, 255, 166, 165), 105: (86, 295, 176, 205), 240: (66, 107, 129, 45)}


def loose_crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A square crop three face-widths wide around ``box``, the frame's edge repeated where it runs out."""
    top, right, bottom, left = box
    half = int(1.5 * max(bottom - top, right - left))
    padded = np.pad(frame, ((half, half), (half, half), (0, 0)), mode="edge")
    y, x = int((top + bottom) / 2), int((left + right) / 2)
    return np.ascontiguousarray(padded[y : y + 2 * half, x : x + 2 * half])


@pytest.fixture(scope="module")
def faces() -> dict[int, np.ndarray]:
    """Loose RGB face crops of the clip by frame number."""
    crops = {}
    with av.open(str(HAMILTON)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in FACE_BOXES:
                crops[number] = loose_crop(frame.to_ndarray(format="rgb24"), FACE_BOXES[number])
            if len(crops) == len(FACE_BOXES):
                break
    return crops


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


#: Track -> its crops (frame, source: a clip frame's face, "grey" for a crop without a face, "missing" for no file).
TRACKS = {
    "ta": [(90, 90), (100, "grey"), (105, 105)],
    "tb": [(100, "grey"), (110, "grey")],
    "tc": [(240, 240)],
    "td": [(0, 0), (5, "missing")],
}
LABELS = {"ta": "performer", "tb": "performer", "tc": "audience", "td": "performer"}


def build_trackset(root: Path, faces: dict[int, np.ndarray]) -> Path:
    (root / "crops").mkdir(parents=True)
    crop_rows = []
    for track, crops in TRACKS.items():
        for frame, source in crops:
            path = f"crops/{track}_{frame:04d}.png"
            crop_rows.append((track, frame, path))
            if source == "grey":
                Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(root / path)
            elif source != "missing":
                Image.fromarray(faces[source]).save(root / path)
    tracks = [(t, "s1" if t != "tc" else "s2", min(f for f, _ in c), max(f for f, _ in c)) for t, c in TRACKS.items()]
    write_csv(root / "tracks.csv", ["track_id", "shot_id", "start_frame", "end_frame"], tracks)
    write_csv(root / "crops.csv", ["track_id", "frame", "path"], crop_rows)
    write_csv(root / "labels.csv", ["track_id", "identity"], list(LABELS.items()))
    return root


@pytest.fixture(scope="module")
def trackset(faces, tmp_path_factory) -> Path:
    return build_trackset(tmp_path_factory.mktemp("trackset"), faces)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peers_cache")


def reference(path: Path) -> np.ndarray:
    """face_recognition's own descriptor of the one face in an image file."""
    (encoding,) = face_recognition.face_encodings(face_recognition.load_image_file(path))
    return encoding


def test_track_means_skip_crops_without_a_face() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4))
    x[[1, 4, 5]] = np.nan
    crop_track = np.array([0, 0, 2, 0, 1, 1, 2])
    means, counts = track_means(x, crop_track, 4)
    np.testing.assert_array_equal(counts, [2, 0, 2, 0])
    np.testing.assert_allclose(means[0], (x[0] + x[3]) / 2)
    np.testing.assert_allclose(means[2], (x[2] + x[6]) / 2)
    assert np.isnan(means[[1, 3]]).all()


def test_descriptors_are_raw_track_means_of_the_crops_with_a_face(trackset: Path, cache: Path) -> None:
    tracks = face_recognition_descriptors(trackset, cache)
    assert tracks.track_ids == list(TRACKS)
    np.testing.assert_array_equal(tracks.crops, [3, 2, 1, 2])
    np.testing.assert_array_equal(tracks.crops_with_face, [2, 0, 1, 1])
    np.testing.assert_array_equal(tracks.described, [True, False, True, True])
    assert tracks.descriptors.shape == (4, 128) and tracks.descriptors.dtype == np.float64

    expected_a = (reference(trackset / "crops/ta_0090.png") + reference(trackset / "crops/ta_0105.png")) / 2
    np.testing.assert_allclose(tracks.descriptors[0], expected_a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tracks.descriptors[2], reference(trackset / "crops/tc_0240.png"), rtol=0, atol=1e-12)
    assert np.isnan(tracks.descriptors[1]).all()
    # Not normalised: dlib's raw descriptors are not unit vectors, nor are their means.
    assert np.abs(np.linalg.norm(tracks.descriptors[[0, 2, 3]], axis=1) - 1).min() > 0.01
    # One person's two frames are within face_recognition's tolerance; the others are not.
    assert np.linalg.norm(reference(trackset / "crops/ta_0090.png") - reference(trackset / "crops/ta_0105.png")) < 0.6
    assert np.linalg.norm(tracks.descriptors[0] - tracks.descriptors[2]) > 0.6


def test_the_largest_face_of_a_crop_is_described(faces) -> None:
    big, small = faces[90], faces[240]
    canvas = np.full((big.shape[0] + 20, big.shape[1] + small.shape[1] + 20, 3), 128, np.uint8)
    canvas[: big.shape[0], : big.shape[1]] = big
    canvas[-small.shape[0] :, -small.shape[1] :] = small
    descriptor, n_faces = crop_descriptor(canvas)
    assert n_faces == 2
    (alone_big,), (alone_small,) = face_recognition.face_encodings(big), face_recognition.face_encodings(small)
    assert np.linalg.norm(descriptor - alone_big) < 0.3 < np.linalg.norm(descriptor - alone_small)
    assert crop_descriptor(np.full((128, 128, 3), 128, np.uint8)) == (None, 0)


def test_the_cache_answers_reruns_and_a_changed_file_invalidates_it(
    trackset: Path, faces, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = build_trackset(tmp_path / "copy", faces)
    cache = tmp_path / "cache"
    first = face_recognition_descriptors(data, cache)
    assert not first.cached and first.seconds > 0
    assert len(list(cache.glob("*.npz"))) == 1

    def no_detection(image: np.ndarray) -> tuple[None, int]:
        raise AssertionError("the cache should have answered")

    with monkeypatch.context() as patch:
        patch.setattr(peers, "crop_descriptor", no_detection)
        again = face_recognition_descriptors(data, cache)
    assert again.cached and again.seconds == first.seconds
    np.testing.assert_array_equal(again.descriptors, first.descriptors)
    np.testing.assert_array_equal(again.crops_with_face, first.crops_with_face)

    # The same files at another path have a cache entry of their own.
    assert not face_recognition_descriptors(trackset, cache).cached
    assert len(list(cache.glob("*.npz"))) == 2

    # A crop rewritten (a new time, then a face where there was none) is recomputed; the stale entry goes.
    grey = data / "crops/tb_0100.png"
    stat = grey.stat()
    os.utime(grey, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not face_recognition_descriptors(data, cache).cached
    Image.fromarray(faces[105]).save(grey)
    changed = face_recognition_descriptors(data, cache)
    assert not changed.cached
    np.testing.assert_array_equal(changed.crops_with_face, [2, 1, 1, 1])
    assert len(list(cache.glob(f"{data.name}-*.npz"))) == 1


def test_an_unreadable_crop_is_an_error_naming_it(faces, tmp_path: Path) -> None:
    data = build_trackset(tmp_path / "copy", faces)
    (data / "crops/tc_0240.png").write_bytes(b"not an image")
    with pytest.raises(TracksetError, match="tc_0240.png: not a readable image"):
        face_recognition_descriptors(data, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_peer_rows_on_the_tiny_trackset(trackset: Path, cache: Path) -> None:
    rows = {row.name: row for row in peer_rows(trackset, LABELS, cache)}
    assert list(rows) == [baseline.name for baseline in BASELINES]
    # tb has no face: Unknown in every row, a singleton in WCP and BCubed, no cluster in PCR.
    assert all(row.unknown_fraction >= 0.25 for row in rows.values())
    average = rows["Agglomerative average (0.6)"]
    assert (average.n_clusters, average.wcp, average.pcr, average.unknown_fraction) == (2, 1.0, 1.0, 0.25)
    # The performer's three tracks: ta and td together, tb alone (recall 2/3, 2/3, 1/3); the audience's one: 1.
    assert average.bcubed_precision == 1.0 and average.bcubed_recall == pytest.approx(2 / 3)
    # DBSCAN needs 5 points within eps for a core point: three tracks are all noise, hence Unknown.
    dbscan = rows["DBSCAN (eps 0.5)"]
    assert (dbscan.n_clusters, dbscan.unknown_fraction, dbscan.pcr) == (0, 1.0, 0.0)
    assert rows["Agglomerative at true k (uses ground truth)"].uses_ground_truth


def test_raw_descriptors_reach_the_clustering(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Three people on one ray at different norms: far apart as they are, one point once normalised.
    raw = np.zeros((4, 128))
    raw[:, 0] = [1.0, np.nan, 2.0, 3.0]
    raw[1] = np.nan
    descriptors = TrackDescriptors(
        track_ids=["p", "q", "r", "s"],
        descriptors=raw,
        crops=np.array([1, 1, 1, 1]),
        crops_with_face=np.array([1, 0, 1, 1]),
        seconds=1.0,
        cached=True,
    )
    monkeypatch.setattr(peers, "face_recognition_descriptors", lambda trackset_dir, cache_dir: descriptors)
    seen: list[tuple[np.ndarray, int]] = []

    def record(x: np.ndarray, k_true: int) -> np.ndarray:
        seen.append((x.copy(), k_true))
        return np.array([0, -1, 0])

    average = next(b for b in BASELINES if b.name == "Agglomerative average (0.6)")
    monkeypatch.setattr(peers, "BASELINES", [average, Baseline("recorder", "records its input", False, record)])
    labels = {"p": "one", "q": "two", "r": "three", "s": "four"}
    clustered, recorded = peer_rows(tmp_path, labels, tmp_path)

    ((x, k_true),) = seen
    np.testing.assert_array_equal(x, raw[[0, 2, 3]])
    assert k_true == 3  # four identities, but only three tracks to cluster
    assert (clustered.n_clusters, clustered.wcp, clustered.unknown_fraction) == (3, 1.0, 0.25)
    # Noise (-1) is Unknown: q has no descriptor, r is noise; p and s share a cluster.
    assert (recorded.n_clusters, recorded.unknown_fraction, recorded.wcp) == (1, 0.5, 0.75)


def test_cli_writes_json_and_markdown(trackset: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(peers, "RESULTS", tmp_path)
    assert peers.main(["--trackset", str(trackset), "--name", "tiny", "--cache-dir", str(cache)]) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert (result["n_tracks"], result["n_crops"], result["n_identities"]) == (4, 8, 2)
    assert (result["crops_with_face"], result["tracks_with_face"]) == (4, 3)
    assert [row["name"] for row in result["rows"]] == [baseline.name for baseline in BASELINES]
    assert result["chain"]["upsample"] == 1 and result["machine"] and result["measured_at"]
    page = (tmp_path / "tiny.md").read_text()
    assert "HOG found a face in 4 of 8 crops" in page
    assert page.count("\n| ") == 1 + len(BASELINES)  # the header, then one row per peer
