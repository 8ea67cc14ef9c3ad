"""``vcn cluster-tracks`` and ``vcn evaluate`` end to end, on a small track dataset of real faces.

The dataset is cut from the CelebA DEV crops in shared/ (faces.csv gives each
face box): 4 identities x 3 tracks x 4 loose crops (square, face centred, side
twice the face box, 128 px, with a little jitter of framing and scale). Each
crop of a track is another photo of the person, standing in for the pose and
expression changes along a real track; four jittered copies of one photo would
be a track with no spread at all, which no video gives (its adaptive
threshold would then accept no other track). On top:

- ``A0`` and ``B0`` (two people) share a shot with overlapping frames;
- ``C0`` and ``C1`` (one person) do too: cannot-link must keep them apart,
  which shows that the constraint acts; without it they join;
- ``gone``: its crop files do not exist (a read problem);
- ``broken``: three good crops and one that is not an image (an alignment problem).

The backbone loads once per CLI run; the set is clustered twice (cannot-link on
and off) in one module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_path
from vcn_assets.cli import main

pytestmark = pytest.mark.slow

#: Well-separated DEV identities (high within-identity cosine in identity_qa.csv).
IDENTITIES = {"A": "7417", "B": "7385", "C": "7359", "D": "7277"}
TRACKS_PER_IDENTITY = 3
CROPS_PER_TRACK = 4
CROP_SIDE = 128


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@dataclass
class Dataset:
    root: Path
    truth: Path  # the labels, outside the dataset folder
    identity: dict[str, str]  # track id -> identity


def run_cli(*argv: str | Path) -> Run:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(arg) for arg in argv])
    return Run(code, stdout.getvalue(), stderr.getvalue())


def read_predictions(path: Path) -> dict[str, str]:
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["track_id", "cluster"]
    return {row["track_id"]: row["cluster"] for row in rows}


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def loose_crop(image: np.ndarray, box: tuple[float, float, float, float], rng: np.random.Generator) -> np.ndarray:
    """A square crop centred on the face box, side twice the box, jittered a little, CROP_SIDE px."""
    import cv2

    x1, y1, x2, y2 = box
    side = 2.0 * max(x2 - x1, y2 - y1) * rng.uniform(0.95, 1.05)
    cx = (x1 + x2) / 2 + rng.normal(0.0, 0.02 * side)
    cy = (y1 + y2) / 2 + rng.normal(0.0, 0.02 * side)
    scale = CROP_SIDE / side
    warp = np.array([[scale, 0.0, CROP_SIDE / 2 - scale * cx], [0.0, scale, CROP_SIDE / 2 - scale * cy]])
    return cv2.warpAffine(image, warp, (CROP_SIDE, CROP_SIDE), flags=cv2.INTER_AREA, borderValue=(0, 0, 0))


def build_dataset(root: Path, celeba: Path) -> Dataset:
    import cv2

    with open(celeba / "faces.csv", newline="") as file:
        faces = [row for row in csv.DictReader(file) if row["identity"] in IDENTITIES.values()]
    rng = np.random.default_rng(0)
    (root / "crops").mkdir(parents=True)
    tracks, crops, identity = [], [], {}

    def add_track(track_id: str, shot: str, start: int, photos: list[dict]) -> None:
        tracks.append((track_id, shot, start, start + CROPS_PER_TRACK - 1))
        identity[track_id] = photos[0]["identity"]
        for k, face in enumerate(photos):
            image = cv2.imread(str(celeba / face["path"]))
            box = tuple(float(face[key]) for key in ("box_x1", "box_y1", "box_x2", "box_y2"))
            path = f"crops/{track_id}_{k}.jpg"
            cv2.imwrite(str(root / path), loose_crop(image, box, rng))
            crops.append((track_id, start + k, path))

    for letter, celeb in IDENTITIES.items():
        photos = [face for face in faces if face["identity"] == celeb]
        for t in range(TRACKS_PER_IDENTITY):
            track_id = f"{letter}{t}"
            # A0 with B0, and C0 with C1, on screen together: same shot, overlapping frames.
            shot = {"A0": "s-AB", "B0": "s-AB", "C0": "s-CC", "C1": "s-CC"}.get(track_id, f"s-{track_id}")
            start = {"B0": 2, "C1": 1}.get(track_id, 0)  # every track spans 4 frames from its start
            add_track(track_id, shot, start, photos[t * CROPS_PER_TRACK : (t + 1) * CROPS_PER_TRACK])
    # Per-track problems: crop files that do not exist; an unreadable crop among good ones.
    tracks.append(("gone", "s-gone", 0, 3))
    identity["gone"] = IDENTITIES["D"]
    crops.extend(("gone", frame, f"crops/gone_{frame}.jpg") for frame in range(4))
    photos_a = [face for face in faces if face["identity"] == IDENTITIES["A"]]
    add_track("broken", "s-broken", 0, photos_a[-3:])
    (root / "crops" / "broken_3.jpg").write_bytes(b"not a JPEG")
    crops.append(("broken", 3, "crops/broken_3.jpg"))

    write_csv(root / "tracks.csv", ["track_id", "shot_id", "start_frame", "end_frame"], tracks)
    write_csv(root / "crops.csv", ["track_id", "frame", "path"], crops)
    write_csv(root / "labels.csv", ["track_id", "identity"], sorted(identity.items()))
    truth = root.parent / "truth.csv"
    shutil.copy(root / "labels.csv", truth)
    return Dataset(root=root, truth=truth, identity=identity)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    celeba = shared_path("data", "celeba-faces")
    return build_dataset(tmp_path_factory.mktemp("trackset") / "episode", celeba)


@pytest.fixture(scope="module")
def clustered(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:
    """The dataset clustered with cannot-link (and a report), and without on a copy with garbage labels.csv."""
    out = tmp_path_factory.mktemp("out")
    with_cl = run_cli("cluster-tracks", dataset.root, "--out", out / "pred.csv", "--report", out / "report")

    garbled = out / "garbled"
    shutil.copytree(dataset.root, garbled)
    (garbled / "labels.csv").write_bytes(b'\xff\xfe\x00track_id;;"unterminated\n\x00\x01')
    (garbled / "labels.csv").chmod(0)
    try:
        without_cl = run_cli("cluster-tracks", garbled, "--out", out / "pred_no_cl.csv", "--no-cannot-link")
    finally:
        (garbled / "labels.csv").chmod(stat.S_IRUSR | stat.S_IWUSR)
    return {"cannot_link": (with_cl, out / "pred.csv"), "no_cannot_link": (without_cl, out / "pred_no_cl.csv")}


def test_cluster_tracks_writes_one_row_per_track_and_pure_clusters(dataset: Dataset, clustered) -> None:
    run, pred = clustered["cannot_link"]
    assert run.code == 0, run.stderr
    predicted = read_predictions(pred)
    assert list(predicted) == list(dataset.identity)  # tracks.csv order, every track

    good = [t for t in dataset.identity if t not in ("gone", "broken")]
    clustered_tracks = [t for t in good if predicted[t]]
    assert len(clustered_tracks) >= len(good) - 1  # at most one track lost to the quality screen
    # Pure: no cluster mixes two people.
    people: dict[str, set[str]] = {}
    for track in clustered_tracks:
        people.setdefault(predicted[track], set()).add(dataset.identity[track])
    assert all(len(members) == 1 for members in people.values()), people
    # Labels are "0", "1", ... by decreasing size.
    sizes = [sum(1 for t in predicted if predicted[t] == str(c)) for c in range(len(people))]
    assert set(people) == {str(c) for c in range(len(people))}
    assert sizes == sorted(sizes, reverse=True)
    # Tracks on screen together are never in one cluster, even of one person.
    for a, b in (("A0", "B0"), ("C0", "C1")):
        assert not (predicted[a] and predicted[a] == predicted[b]), (a, b, predicted)

    assert f"{len(dataset.identity)} tracks:" in run.stdout
    assert "2 with problems" in run.stdout
    assert "cannot-link on" in run.stdout
    assert "detected" in run.stdout and "seconds:" in run.stdout
    # The default base model (SFace) is not finetuned on a CPU, and the output says why; clustered by cosine.
    assert "model sface-2021dec-" in run.stdout and "-ft-" not in run.stdout
    assert "not finetuned: not finetuned on a CPU: SFace's CPU budget" in run.stdout
    assert "cosine dissimilarity" in run.stdout and "finetune" not in run.stdout.split("seconds:")[1]


def test_loss_similarity_and_no_finetune(dataset: Dataset, tmp_path: Path) -> None:
    # dlib's ResNet is finetuned on a CPU (the CPU budget mode), and its loss metric clusters.
    loss = run_cli(
        "cluster-tracks", dataset.root, "--out", tmp_path / "loss.csv", "--similarity", "loss", "--backbone", "dlib-resnet"
    )
    assert loss.code == 0, loss.stderr
    assert "loss dissimilarity" in loss.stdout and "-ft-" in loss.stdout
    assert "(cpu-budget)" in loss.stdout and "pairs/s" in loss.stdout and "finetune" in loss.stdout.split("seconds:")[1]
    predicted = read_predictions(tmp_path / "loss.csv")
    assert list(predicted) == list(dataset.identity)
    for a, b in (("A0", "B0"), ("C0", "C1")):
        assert not (predicted[a] and predicted[a] == predicted[b]), (a, b, predicted)

    plain = run_cli("cluster-tracks", dataset.root, "--out", tmp_path / "plain.csv", "--no-finetune")
    assert plain.code == 0, plain.stderr
    assert "-ft-" not in plain.stdout and "finetuned" not in plain.stdout and "cosine dissimilarity" in plain.stdout

    refused = run_cli("cluster-tracks", dataset.root, "--out", tmp_path / "x.csv", "--no-finetune", "--similarity", "loss")
    assert refused.code == 2 and "needs the finetuned model" in refused.stderr
    assert not (tmp_path / "x.csv").exists()


def test_another_backbone_by_name(dataset: Dataset, tmp_path: Path) -> None:
    """``--backbone dlib-resnet``: the crops are aligned for its template (dlib's 150 px) and it clusters them."""
    run = run_cli(
        "cluster-tracks", dataset.root, "--out", tmp_path / "dlib.csv", "--backbone", "dlib-resnet", "--no-finetune"
    )
    assert run.code == 0, run.stderr
    assert "model dlib-resnet-v1-" in run.stdout
    predicted = read_predictions(tmp_path / "dlib.csv")
    assert list(predicted) == list(dataset.identity)
    people: dict[str, set[str]] = {}
    for track, cluster in predicted.items():
        if cluster:
            people.setdefault(cluster, set()).add(dataset.identity[track])
    assert people and all(len(members) == 1 for members in people.values()), people

    refused = run_cli("cluster-tracks", dataset.root, "--out", tmp_path / "x.csv", "--backbone", "iresnet50")
    assert refused.code == 2 and "needs a checkpoint" in refused.stderr


def test_problem_tracks_are_reported_and_left_unknown(clustered) -> None:
    run, pred = clustered["cannot_link"]
    predicted = read_predictions(pred)
    assert predicted["gone"] == "" and predicted["broken"] == ""
    warnings = run.stderr.splitlines()
    assert any("'gone'" in line and "gone_0.jpg does not exist" in line for line in warnings), run.stderr
    assert any("'broken'" in line and "broken_3.jpg" in line for line in warnings), run.stderr
    assert all(line.startswith("vcn cluster-tracks: warning: track ") for line in warnings), run.stderr


def test_no_cannot_link_lets_tracks_on_screen_together_join(dataset: Dataset, clustered) -> None:
    """Also: clustering never reads labels.csv (garbage and unreadable in this run)."""
    run, pred = clustered["no_cannot_link"]
    assert run.code == 0, run.stderr
    assert "cannot-link off" in run.stdout
    predicted = read_predictions(pred)
    assert list(predicted) == list(dataset.identity)
    assert predicted["C0"] and predicted["C0"] == predicted["C1"]
    assert predicted["A0"] != predicted["B0"]


def test_report_is_written(clustered, dataset: Dataset) -> None:
    run, pred = clustered["cannot_link"]
    report = pred.parent / "report"
    for name in ("contact_sheet.png", "embedding_plot.png", "report.html"):
        assert (report / name).stat().st_size > 0, name
    # labels.csv of the dataset colours the report: majority identities appear on the page.
    assert IDENTITIES["A"] in (report / "report.html").read_text()
    assert "wrote report" in run.stdout


def test_missing_column_is_bad_input_and_leaves_pred_untouched(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "tracks.csv").write_text("track_id,shot_id,start_frame\nt1,s1,0\n")
    (root / "crops.csv").write_text("track_id,frame,path\nt1,0,crops/t1.jpg\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("earlier results\n")

    run = run_cli("cluster-tracks", root, "--out", pred)

    assert run.code == 2
    assert "tracks.csv, line 1" in run.stderr and "end_frame" in run.stderr
    assert pred.read_text() == "earlier results\n"
    assert {p.name for p in tmp_path.iterdir()} == {"bad", "pred.csv"}  # no temporary file left


def test_evaluate_prints_the_table_and_writes_json(dataset: Dataset, clustered, tmp_path: Path) -> None:
    _, pred = clustered["cannot_link"]
    out = tmp_path / "scores.json"

    run = run_cli("evaluate", dataset.truth, pred, "--json", out)

    assert run.code == 0, run.stderr
    assert "WCP" in run.stdout and "BCubed F" in run.stdout
    scores = json.loads(out.read_text())
    assert {"wcp", "pcr", "bcubed_f"} <= set(scores)
    assert scores["n_tracks"] == len(dataset.identity)
    assert scores["n_unknown"] >= 2  # gone, broken

    as_json = run_cli("evaluate", dataset.truth, pred, "--format", "json")
    assert as_json.code == 0
    assert json.loads(as_json.stdout) == scores


def test_evaluate_with_a_labelled_track_missing_from_the_prediction_is_bad_input(
    clustered, dataset: Dataset, tmp_path: Path
) -> None:
    _, pred = clustered["cannot_link"]
    short = tmp_path / "short.csv"
    short.write_text("".join(line for line in pred.read_text().splitlines(keepends=True) if not line.startswith("C2,")))

    run = run_cli("evaluate", dataset.truth, short, "--json", tmp_path / "scores.json")

    assert run.code == 2
    assert "'C2'" in run.stderr and str(short) in run.stderr
    assert not (tmp_path / "scores.json").exists()
    assert run.stdout == ""
