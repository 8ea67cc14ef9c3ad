"""`vcn process` end to end on the Hamilton clip: a real Dagster instance, Parquet files, DuckDB."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests import media
from tests.conftest import HAMILTON, HAMILTON_CUTS, hamilton_artifact, processed_hamilton
from vcn.clustering.cannot_link import on_screen_together
from vcn.faces.align import get_template
from vcn.faces.crops import read_crop_images
from vcn.faces.detection import create_detector
from vcn.faces.filters import REASONS
from vcn.stores.warehouse import Warehouse
from vcn_assets.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A project data folder in which the Hamilton clip has been processed once, with dlib's ResNet registered:
    a backbone that is finetuned on a CPU, so that these tests follow the whole method (the default's
    run on a CPU is tested in test_default_backbone)."""
    yield from processed_hamilton(tmp_path_factory, backbone="dlib-resnet")


def _warehouse(home: Path) -> Warehouse:
    return Warehouse(str(home / "warehouse.duckdb"))


def test_every_asset_wrote_its_parquet_and_table(env):
    for name in ("shots", "frames", "face_detections", "face_tracks", "tracks", "track_crops", "face_clusters"):
        assert hamilton_artifact(env, name + ".parquet").exists(), name
    wh = _warehouse(env)
    for table in ("movies", "shots", "frames", "detections", "tracks", "track_crops", "track_embeddings", "face_clusters"):
        assert wh.query(f"SELECT count(*) FROM {table} WHERE movie_id = 'hamilton'").item() > 0, table
    lineage = wh.query("SELECT DISTINCT asset FROM lineage WHERE movie_id = 'hamilton'")["asset"].to_list()
    assert sorted(lineage) == [
        "face_clusters", "face_detections", "face_tracks", "finetuned_model", "frames", "shots", "track_crops",
        "track_embeddings",
    ]
    metrics = wh.query("SELECT asset, seconds, realtime_factor FROM stage_metrics WHERE movie_id = 'hamilton'")
    assert (metrics["seconds"] > 0).all()


def test_each_stage_records_the_frames_it_decoded(env):
    # One pass over the video finds the shots, times the frames and feeds the detector; the crops come from the
    # chips that pass cut.
    wh = _warehouse(env)
    decoded = dict(
        wh.query(
            "SELECT asset, arg_max(frames_decoded, recorded_at) FROM stage_metrics WHERE movie_id = 'hamilton' "
            "GROUP BY asset"
        ).rows()
    )
    n = wh.query("SELECT count(*) FROM frames WHERE movie_id = 'hamilton'").item()
    assert n == 275
    assert decoded == {
        "shots": n, "frames": 0, "face_detections": 0, "face_tracks": 0, "track_crops": 0, "finetuned_model": 0,
        "track_embeddings": 0, "face_clusters": 0,
    }
    assert hamilton_artifact(env, "frame_times.parquet").exists()
    assert hamilton_artifact(env, "detection_chips.parquet").exists()
    details = wh.query(
        "SELECT arg_max(details, recorded_at) FROM stage_metrics WHERE movie_id = 'hamilton' AND asset = 'track_crops'"
    ).item()
    assert json.loads(details)["cut_from"] == "detection chips"


def test_cuts_are_found(env):
    starts = pl.read_parquet(hamilton_artifact(env, "shots.parquet"))["start_frame"].to_list()
    assert len(starts) == 4 and all(abs(a - b) <= 1 for a, b in zip(starts[1:], HAMILTON_CUTS))


def test_faces_are_found_where_people_are_on_screen(env):
    frames = pl.read_parquet(hamilton_artifact(env, "frames.parquet"))
    det = pl.read_parquet(hamilton_artifact(env, "face_tracks.parquet"))
    sampled = frames.filter("sampled")["frame"].to_list()
    with_faces = set(det["frame"].to_list())
    # People are on screen in every shot of this clip.
    assert len(with_faces) >= 0.9 * len(sampled)
    per_frame = det.group_by("frame").len()["len"]
    assert per_frame.max() >= 4  # the audience shots
    # Boxes are in pixels of the original 640x360 video.
    assert det["x1"].min() >= 0 and det["x2"].max() <= 640 and det["y2"].max() <= 360


def test_no_track_crosses_a_cut(env):
    det = pl.read_parquet(hamilton_artifact(env, "face_tracks.parquet")).filter(pl.col("track_id").is_not_null())
    shots = pl.read_parquet(hamilton_artifact(env, "shots.parquet"))
    cut_frames = set(shots["start_frame"].to_list())
    spans = det.group_by("track_id").agg(pl.col("frame").min().alias("a"), pl.col("frame").max().alias("b"), pl.col("shot_id").n_unique().alias("n"))
    assert (spans["n"] == 1).all()
    for a, b in spans.select("a", "b").iter_rows():
        assert not any(a < c <= b for c in cut_frames)


def test_aligned_crops_put_the_eyes_where_the_template_says(env):
    """Re-detects the face in frontal crops: its eyes must sit on the template's eyes."""
    crops = pl.read_parquet(hamilton_artifact(env, "track_crops.parquet"), columns=["crop_id", "detection_id", "template"])
    assert crops["template"].unique().to_list() == ["dlib-150"]
    det = pl.read_parquet(hamilton_artifact(env, "face_tracks.parquet"))
    # Five-point alignment is defined for faces that look roughly at the camera:
    # keep crops whose eyes are at least 0.35 face widths apart.
    frontal = crops.join(det, on="detection_id").filter(
        (pl.col("left_eye_x") - pl.col("right_eye_x")) >= 0.35 * (pl.col("x2") - pl.col("x1"))
    )["crop_id"].to_list()
    assert len(frontal) >= 20
    _, images = read_crop_images(hamilton_artifact(env, "track_crops.parquet"), frontal)
    template = get_template("dlib-150")
    assert images.shape[1:] == (template.size, template.size, 3)
    detector = create_detector("retinaface", max_side=None, score_threshold=0.5)
    eye_distance = float(np.linalg.norm(template.points[1] - template.points[0]))
    errors = []
    for image in images:
        # Pad so that the detector sees the face with context, as in a frame.
        pad = template.size // 2
        found = detector.detect([np.pad(image, ((pad, pad), (pad, pad), (0, 0)))])[0]
        if len(found):
            eyes = found.landmarks[int(np.argmax(found.scores)), :2] - pad
            errors.append(np.linalg.norm(eyes - template.points[:2], axis=1).max())
    assert len(errors) >= 0.5 * len(images)
    assert np.median(errors) < 0.15 * eye_distance


def test_rejected_crops_are_kept_with_a_reason(env):
    wh = _warehouse(env)
    reasons = wh.query("SELECT reject_reason, rejected FROM track_crops WHERE movie_id = 'hamilton'")
    assert (reasons["rejected"] == reasons["reject_reason"].is_not_null()).all()
    assert set(reasons["reject_reason"].drop_nulls().to_list()) <= set(REASONS)


def test_export_writes_detections_and_clusters_csv(env, tmp_path):
    assert main(["export", "hamilton", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "detections.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["frame", "x1", "y1", "x2", "y2", "score", "track_id", "detected"]
    # Every detection once, as detected; every other row fills a track's frames between two of its detections.
    n = _warehouse(env).query("SELECT count(*) FROM detections WHERE movie_id = 'hamilton'").item()
    assert sum(r[7] == "1" for r in rows[1:]) == n
    assert all(r[5] == "" and r[6] != "" for r in rows[1:] if r[7] == "0")
    frames = [int(r[0]) for r in rows[1:]]
    assert frames == sorted(frames) and 0 <= frames[0] and frames[-1] < 275
    tracks = _warehouse(env).query(
        "SELECT track_id, start_frame, end_frame FROM tracks WHERE movie_id = 'hamilton' ORDER BY track_id"
    )
    for track, start, end in tracks.rows():
        assert [int(r[0]) for r in rows[1:] if r[6] == str(track)] == list(range(start, end + 1))

    with open(tmp_path / "clusters.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["track_id", "cluster", "unknown_reason"]
    expected = _warehouse(env).query(
        "SELECT track_id, cluster, unknown_reason FROM face_clusters WHERE movie_id = 'hamilton' AND model_version = $1 "
        "ORDER BY track_id",
        [_model_version(env)],
    )
    assert [(int(t), int(c) if c else None, r or None) for t, c, r in rows[1:]] == expected.rows()
    assert any(c == "" and r for _, c, r in rows[1:])  # this clip has tracks without kept crops: Unknown, and why


def test_the_run_log_shows_each_stage_s_progress(env):
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "hamilton"}), limit=1)
        messages = [event.user_message for event in instance.all_logs(run.run_id)]
    assert any(m.startswith("shots: frames decoded 275 / 275 frames (100.0 %)") for m in messages)
    # That one pass also built the frame index and fed the detector; the crops came from its chips.
    assert not any(
        m.startswith(("frames: frames decoded", "face_detections: frames decoded", "track_crops: frames decoded"))
        for m in messages
    )
    assert any(m.startswith("track_embeddings: crops embedded ") for m in messages)
    assert any(m.startswith("finetuned_model: round 1 epochs ") for m in messages)


def test_preview_draws_the_tracks_on_the_movie(env, tmp_path):
    import av

    out = tmp_path / "hamilton.mp4"
    assert main(["preview", "hamilton", "--out", str(out)]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (640, 360)
        assert sum(1 for _ in container.decode(stream)) == 275
    # Nothing to preview without the movie's results.
    assert main(["preview", "no-such-movie", "--out", str(tmp_path / "none.mp4")]) != 0
    assert not (tmp_path / "none.mp4").exists()


def test_sql_is_read_only(env, capsys):
    assert main(["sql", "SELECT count(*) AS n FROM tracks", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("n\n")
    assert main(["sql", "DELETE FROM tracks"]) != 0
    assert _warehouse(env).query("SELECT count(*) FROM tracks").item() > 0


def test_reprocessing_is_idempotent(env, capsys):
    wh = _warehouse(env)
    tables = ("shots", "detections", "tracks", "track_crops", "track_embeddings", "face_clusters")
    before = {t: wh.query(f"SELECT count(*) FROM {t}").item() for t in tables}
    assert main(["process", str(HAMILTON), "--movie-id", "hamilton", "--force"]) == 0
    out = capsys.readouterr().out
    assert "4 shots" in out and "tracks" in out and "crops" in out
    after = {t: wh.query(f"SELECT count(*) FROM {t}").item() for t in before}
    assert after == before
    # One set of cluster rows per (movie, model version), from the latest run.
    sets = wh.query("SELECT model_version, count(*) AS n, count(DISTINCT run_id) AS runs FROM face_clusters WHERE movie_id = 'hamilton' GROUP BY 1")
    assert sets.rows() == [(_model_version(env), _n_tracks(env), 1)]
    sizes = wh.query(
        "SELECT count(*) AS n FROM face_clusters WHERE movie_id = 'hamilton' AND cluster IS NOT NULL GROUP BY cluster ORDER BY n DESC"
    )["n"].to_list()
    unknown = wh.query("SELECT count(*) FROM face_clusters WHERE movie_id = 'hamilton' AND cluster IS NULL").item()
    assert f"clusters: {len(sizes)} (tracks per cluster, largest first: {', '.join(map(str, sizes))}); Unknown: {unknown} tracks" in out
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("movies") == ["hamilton"]


def test_movie_without_faces_gives_empty_tables(env, tmp_path):
    video = media.make_synthetic(tmp_path, frames=48, size=(320, 240))
    assert main(["process", str(video), "--movie-id", "blank"]) == 0
    wh = _warehouse(env)
    assert wh.query("SELECT count(*) FROM detections WHERE movie_id = 'blank'").item() == 0
    assert wh.query("SELECT count(*) FROM tracks WHERE movie_id = 'blank'").item() == 0
    assert wh.query("SELECT count(*) FROM shots WHERE movie_id = 'blank'").item() >= 1
    assert pl.read_parquet(env / "artifacts" / "movies" / "blank" / "track_crops.parquet").height == 0
    assert pl.read_parquet(env / "artifacts" / "movies" / "blank" / "face_clusters.parquet").height == 0
    assert wh.query("SELECT count(*) FROM face_clusters WHERE movie_id = 'blank'").item() == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (media.make_not_a_video, "not a media file"),
        (media.make_zero_length, "empty"),
        (media.make_audio_only, "no video stream"),
    ],
)
def test_bad_input_is_refused_before_anything_is_registered(env, tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["process", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (env / "artifacts" / "movies" / path.stem.replace("_", "-")).exists()


def test_a_failed_run_keeps_the_previous_good_outputs(env, monkeypatch, capsys):
    path = hamilton_artifact(env, "face_detections.parquet")
    before = path.read_bytes()
    tracks_before = _warehouse(env).query("SELECT count(*) FROM tracks WHERE movie_id = 'hamilton'").item()

    def explode(self, images):
        raise RuntimeError("detector crashed half-way")

    monkeypatch.setattr("vcn.faces.detection.retinaface.RetinaFaceDetector.detect", explode)
    assert main(["process", str(HAMILTON), "--movie-id", "hamilton", "--force"]) == 1
    assert "detector crashed half-way" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.partial"))
    assert _warehouse(env).query("SELECT count(*) FROM tracks WHERE movie_id = 'hamilton'").item() == tracks_before


def test_another_file_under_a_taken_movie_id_is_refused(env, tmp_path, capsys):
    other = media.make_synthetic(tmp_path, frames=10)
    assert main(["process", str(other), "--movie-id", "hamilton"]) == 2
    assert "already registered" in capsys.readouterr().err


def test_invalid_movie_id(env, capsys):
    assert main(["process", str(HAMILTON), "--movie-id", "a,b"]) == 2
    assert "invalid movie id" in capsys.readouterr().err


def test_truncated_video_is_processed_as_far_as_it_decodes(env, tmp_path):
    video = media.make_truncated(tmp_path, HAMILTON)
    assert main(["process", str(video), "--movie-id", "cut-off"]) == 0
    movie = _warehouse(env).query("SELECT decoded_frames, frame_count, decode_warnings FROM movies WHERE movie_id = 'cut-off'").row(0)
    assert 0 < movie[0] < movie[1] == 275
    assert "truncated" in movie[2]


def test_ui_serves_this_code_location(env, tmp_path):
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vcn_assets.cli", "ui", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True,
    )
    children = []
    try:
        query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
        deadline, nodes = time.monotonic() + 120, None
        while time.monotonic() < deadline and nodes is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", query, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    nodes = json.load(response)["data"]["assetNodes"]
            except OSError:
                time.sleep(1)
        assert nodes is not None, "the webserver did not answer within 120 s"
        assert {n["assetKey"]["path"][0] for n in nodes} == {
            "shots", "frames", "face_detections", "face_tracks", "track_crops", "base_model", "finetuned_model", "track_embeddings", "face_clusters"
        }
        # SIGTERM to `vcn ui` alone stops it within 10 s, with the webserver and daemon it started.
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "vcn ui started no Dagster process"
        stopped = time.monotonic()
        proc.send_signal(15)
        assert proc.wait(10) == 0
        assert time.monotonic() - stopped < 10
        _, alive = psutil.wait_procs(children, timeout=1)
        assert not alive, [(p.pid, p.name()) for p in alive]
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
    finally:
        for child in children:  # never left running, whatever failed above
            child.kill() if child.is_running() else None
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(30)


def test_vcn_ui_stops_a_child_that_ignores_sigterm_after_its_grace(tmp_path):
    """Ctrl-C (SIGINT) to the supervisor: SIGTERM to the child's group, then SIGKILL once the grace is over."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from vcn_assets.cli import UI_STOP_GRACE_S

    script = (
        "import subprocess, sys\n"
        "from vcn_assets.cli import _supervise\n"
        "child = subprocess.Popen(['sh', '-c', 'trap \"\" TERM; sleep 300 & wait'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "sys.exit(_supervise(child))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        shell = psutil.Process(int(proc.stdout.readline()))
        time.sleep(0.5)
        group = [shell, *shell.children(recursive=True)]
        assert len(group) == 2  # the shell and its sleep
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(UI_STOP_GRACE_S + 4) == 0
        assert UI_STOP_GRACE_S - 0.5 < time.monotonic() - started < UI_STOP_GRACE_S + 4
        _, alive = psutil.wait_procs(group, timeout=2)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()


def test_track_embeddings_carry_the_model_version(env):
    crops = pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))
    matrix = np.load(hamilton_artifact(env, "crop_embeddings.npy"))
    kept = pl.read_parquet(hamilton_artifact(env, "track_crops.parquet"), columns=["rejected"]).filter(~pl.col("rejected")).height
    assert matrix.shape == (kept, 128) and crops.height == kept and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    wh = _warehouse(env)
    (base,) = wh.query("SELECT version FROM models WHERE name = 'dlib-resnet'")["version"].to_list()
    assert base.startswith("dlib-resnet-v1-")
    # Embedded by the movie's finetuned model, whose version names its base.
    (version,) = crops["model_version"].unique().to_list()
    assert version.startswith(base + "-ft-")
    tracks = wh.query("SELECT track_id, model_version, quality, embedding FROM track_embeddings WHERE movie_id = 'hamilton'")
    assert tracks["model_version"].unique().to_list() == [version]
    assert tracks.height == crops["track_id"].n_unique()
    # dlib's torch port scores SER-FIQ quality: every kept crop has one, in (0, 1], and a track has its crops' mean.
    assert crops.schema["quality"] == pl.Float32 and crops["quality"].null_count() == 0
    assert crops["quality"].min() > 0 and crops["quality"].max() <= 1
    means = crops.group_by("track_id").agg(pl.col("quality").mean().alias("expected")).join(tracks, on="track_id")
    assert np.allclose(means["quality"], means["expected"], atol=1e-6)
    # Crops of one track are closer to each other than to crops of other tracks (many of which
    # show the same performer, and dlib's descriptors sit in a narrow cone: cosines of 0.85-0.9
    # between different tracks, about 0.97 inside a track).
    track_of = crops["track_id"].to_numpy()
    sims = matrix @ matrix.T
    same = track_of[:, None] == track_of[None, :]
    off_diagonal = ~np.eye(len(track_of), dtype=bool)
    assert sims[same & off_diagonal].mean() > sims[~same].mean() + 0.05


def _model_version(home: Path) -> str:
    return pl.read_parquet(hamilton_artifact(home, "crop_embeddings.parquet"))["model_version"].unique().item()


def _n_tracks(home: Path) -> int:
    return pl.read_parquet(hamilton_artifact(home, "tracks.parquet")).height


def _latest_materialization(asset: str):
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["hamilton"]), limit=1
        ).records
        return record


def _recluster(**config):
    """Materialises face_clusters of hamilton alone, with its checks, on the project's instance."""
    from vcn_assets.assets.clusters import face_clusters
    from vcn_assets.checks import clusters_cover_tracks, clusters_respect_cannot_link

    return _materialise_alone(
        [face_clusters, clusters_respect_cannot_link, clusters_cover_tracks],
        run_config={"ops": {"face_clusters": {"config": config}}} if config else None,
    )


def _materialise_alone(assets: list, run_config: dict | None = None, selection: list[str] | None = None):
    """Materialises the given assets (and checks) of hamilton alone on the project's instance; ``selection``
    picks some assets of a multi-asset."""
    import dagster as dg

    from vcn_assets.definitions import build_resources
    from vcn_assets.settings import Settings

    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            assets, partition_key="hamilton", instance=instance, resources=build_resources(Settings.from_env()),
            run_config=run_config, selection=selection,
        )


def _without_artifact(env, name: str, asset, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Materialises the asset ``key`` (of the definition ``asset``) alone with the artifact ``name`` gone (as a
    movie from an older release lacks it), restores the artifact, and returns the asset's table before and after."""
    table = hamilton_artifact(env, f"{key}.parquet")
    before = pl.read_parquet(table)
    missing = hamilton_artifact(env, name)
    kept = missing.read_bytes()
    missing.unlink()
    try:
        assert _materialise_alone([asset], selection=[key]).success
        return before, pl.read_parquet(table)
    finally:
        missing.write_bytes(kept)


def test_every_track_has_one_cluster_row_with_model_version_and_run(env):
    tracks = pl.read_parquet(hamilton_artifact(env, "tracks.parquet")).sort("track_id")
    clusters = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))
    assert clusters.columns == [
        "movie_id", "track_id", "cluster", "name", "auto_cluster", "quality", "low_quality", "unknown_reason",
        "model_version", "run_id", "clustered_at", "thumbnail",
    ]
    # Without analysts' edits the clusters are the automatic ones.
    assert clusters["cluster"].equals(clusters["auto_cluster"]) and clusters["name"].null_count() == clusters.height
    assert clusters.schema["cluster"] == pl.Int64 and clusters.schema["quality"] == pl.Float32
    assert clusters["track_id"].sort().to_list() == tracks["track_id"].to_list()
    assert clusters["model_version"].unique().to_list() == [_model_version(env)]
    (run_id,) = clusters["run_id"].unique().to_list()
    assert _latest_materialization("face_clusters").run_id == run_id

    rows = _warehouse(env).query("SELECT * FROM face_clusters WHERE movie_id = 'hamilton' ORDER BY track_id")
    assert rows.drop("clustered_at").rows() == clusters.sort("track_id").drop("clustered_at").rows()

    # Clusters are numbered 0.. by decreasing size; tracks without kept crops are Unknown, with no quality.
    sizes = clusters["cluster"].drop_nulls().value_counts().sort("cluster")["count"].to_list()
    assert len(sizes) >= 2 and sizes == sorted(sizes, reverse=True)
    embedded = set(pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))["track_id"].to_list())
    no_crops = clusters.filter(~pl.col("track_id").is_in(list(embedded)))
    assert no_crops.height > 0 and no_crops["cluster"].null_count() == no_crops.height
    assert no_crops["quality"].null_count() == no_crops.height
    assert clusters.filter(pl.col("track_id").is_in(list(embedded)))["quality"].null_count() == 0


def test_tracks_on_screen_together_are_in_different_clusters(env):
    tracks = pl.read_parquet(hamilton_artifact(env, "tracks.parquet")).sort("track_id")
    clusters = tracks.join(pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet")), on="track_id", how="left")["cluster"].to_list()
    pairs = on_screen_together(tracks.with_columns(pl.col("shot_id").cast(pl.String)))
    clustered = [(a, b) for a, b in pairs.tolist() if clusters[a] is not None and clusters[b] is not None]
    assert len(clustered) >= 3  # the last shot shows several faces at once
    assert all(clusters[a] != clusters[b] for a, b in clustered)


def test_cluster_report_is_written_and_in_the_metadata(env):
    import dagster as dg

    metadata = _latest_materialization("face_clusters").asset_materialization.metadata
    report = hamilton_artifact(env, "clusters_report")
    for key, name in (("report", "report.html"), ("contact_sheet", "contact_sheet.png"), ("embedding_plot", "embedding_plot.png")):
        assert isinstance(metadata[key], dg.PathMetadataValue) and metadata[key].path == str(report / name)
        assert (report / name).stat().st_size > 0
    assert metadata["report_preview"].value.startswith("![contact sheet](data:image/png;base64,")
    clusters = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))
    sizes = clusters["cluster"].drop_nulls().value_counts(sort=True)["count"].to_list()
    assert metadata["n_tracks"].value == clusters.height
    assert metadata["n_clusters"].value == len(sizes) and metadata["cluster_sizes"].value == sizes
    assert metadata["n_unknown"].value == clusters["cluster"].null_count()
    assert metadata["model_version"].value == _model_version(env)
    assert metadata["cannot_link"].value is True and metadata["on_screen_together_pairs"].value > 0
    for key in ("n_low_quality", "quality_cut", "rounds", "dissimilarity", "seconds"):
        assert key in metadata, key


def test_finetuned_model_is_stored_with_its_settings_and_curve(env):
    import json

    import dagster as dg

    from vcn.identity.selfsup.finetune import load_finetuned

    record = json.loads(hamilton_artifact(env, "finetuned_model.json").read_text())
    assert record["enabled"] and record["version"] == _model_version(env)
    assert record["mode"] == "cpu-budget" and record["collapse_problems"] == []
    # 14 tracks give too few pairs on screen together to compare it with the pretrained model: it embeds the movie.
    assert record["check"]["pretrained"] is None and record["check"]["keeps_finetuned"]
    assert record["stepped_aside"] is None
    checkpoint = Path(record["checkpoint"])
    assert checkpoint.is_file() and checkpoint.parent == env / "artifacts" / "models" / "finetuned" / "hamilton"
    assert checkpoint.name == f"{record['version']}.safetensors"
    metadata = _latest_materialization("finetuned_model").asset_materialization.metadata
    assert metadata["base_model_version"].value == record["base_version"]
    assert metadata["finetuned_version"].value == record["version"]
    assert metadata["compute_mode"].value == "cpu-budget"
    assert metadata["settings"].value["train"]["view_bank"] == 4
    curve = metadata["loss_curve"].value
    assert len(curve) >= 3 and all(0 < v < metadata["collapse"].value["ln_k"] for v in curve)
    assert metadata["pairs_per_second"].value > 0
    assert metadata["embeds_movie"].value == "finetuned" and metadata["adaptation_check"].value == record["check"]
    assert isinstance(metadata["checkpoint"], dg.PathMetadataValue)
    from vcn.identity.backbone import load_backbone

    model = load_finetuned(checkpoint, load_backbone("dlib-resnet", device="cpu"))
    assert model.version == record["version"]


def test_finetune_check_passed(env):
    import dagster as dg

    record = _latest_materialization("finetuned_model")
    with dg.DagsterInstance.get() as instance:
        events = instance.all_logs(record.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    verdicts = {
        e.dagster_event.asset_check_evaluation_data.asset_check_key.name: e.dagster_event.asset_check_evaluation_data
        for e in events
        if e.dagster_event.asset_check_evaluation_data.asset_key == dg.AssetKey("finetuned_model")
    }
    assert verdicts["finetune_not_collapsed"].passed
    metadata = verdicts["finetune_not_collapsed"].metadata
    assert metadata["problems"].value == "none"
    # A 10-second clip trains a handful of steps: too few for the stuck-loss rule to judge (its loss is
    # still near ln K), and the record says so.
    from vcn.identity.selfsup.finetune import MIN_STEPS_TO_JUDGE_LOSS, STUCK_LOSS_RATIO

    assert metadata["steps"].value < MIN_STEPS_TO_JUDGE_LOSS or metadata["loss_ratio"].value < STUCK_LOSS_RATIO


def test_cluster_checks_passed_in_the_run_that_clustered(env):
    import dagster as dg

    (run_id,) = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))["run_id"].unique().to_list()
    with dg.DagsterInstance.get() as instance:
        events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    verdicts = {
        e.dagster_event.asset_check_evaluation_data.asset_check_key.name: e.dagster_event.asset_check_evaluation_data.passed
        for e in events
        if e.dagster_event.asset_check_evaluation_data.asset_key == dg.AssetKey("face_clusters")
    }
    assert verdicts == {"clusters_respect_cannot_link": True, "clusters_cover_tracks": True}


def test_reclustering_keeps_the_rows_of_other_model_versions(env):
    wh = _warehouse(env)
    version = _model_version(env)
    n = _n_tracks(env)
    old = pl.DataFrame(
        {"track_id": [0, 1], "cluster": [0, None], "run_id": ["old-run"] * 2},
        schema={"track_id": pl.Int64, "cluster": pl.Int64, "run_id": pl.String},
    )
    wh.replace_movie_rows("face_clusters", "hamilton", old, model_version="dlib-resnet-v0-old")

    # Cannot-link off: the paper's clustering; the check does not apply and passes.
    result = _recluster(cannot_link=False)
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert _latest_materialization("face_clusters").asset_materialization.metadata["cannot_link"].value is False

    result = _recluster()
    assert result.success and all(e.passed for e in result.get_asset_check_evaluations())
    sets = wh.query(
        "SELECT model_version, count(*), any_value(run_id) FROM face_clusters WHERE movie_id = 'hamilton' GROUP BY 1 ORDER BY 1"
    )
    assert sets.rows() == [("dlib-resnet-v0-old", 2, "old-run"), (version, n, result.run_id)]
    assert pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))["run_id"].unique().to_list() == [result.run_id]


def test_cluster_ids_stay_stable_across_reclustering(env):
    before = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet")).select("track_id", "cluster").sort("track_id")
    assert _warehouse(env).latest_clusters("hamilton") == {
        t: c for t, c in before.iter_rows() if c is not None
    }
    result = _recluster()
    assert result.success
    after = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet")).select("track_id", "cluster").sort("track_id")
    assert after.equals(before)
    metadata = _latest_materialization("face_clusters").asset_materialization.metadata
    assert metadata["ids_kept_from_previous_run"].value == metadata["n_clusters"].value


def test_analyst_views_over_the_processed_movie(env):
    wh = _warehouse(env)
    tracks = wh.query("SELECT * FROM track_clusters WHERE movie_id = 'hamilton' ORDER BY track_id")
    assert tracks.height == _n_tracks(env)
    clustered = tracks.filter(pl.col("cluster").is_not_null())
    assert clustered.height > 0
    for path in tracks["thumbnail"].drop_nulls():
        assert Path(path).is_file() and Path(path).parent == hamilton_artifact(env, "thumbnails")
    assert clustered["thumbnail"].null_count() == 0
    people = wh.query("SELECT * FROM people WHERE movie_id = 'hamilton' ORDER BY cluster")
    expected = clustered.group_by("cluster").agg(
        pl.len().alias("tracks"), pl.col("duration_s").sum().alias("screen_time_s"), pl.col("start_s").min().alias("first")
    ).sort("cluster")
    assert people["cluster"].to_list() == expected["cluster"].to_list()
    assert people["tracks"].to_list() == expected["tracks"].to_list()
    assert np.allclose(people["screen_time_s"], expected["screen_time_s"]) and np.allclose(people["first_seen_s"], expected["first"])
    assert (people["last_seen_s"] > people["first_seen_s"]).all()
    lineage = wh.query("SELECT * FROM clustering_lineage WHERE movie_id = 'hamilton' AND model_version = $1", [_model_version(env)])
    assert lineage["finetuned"].to_list() == [True] and lineage["base_model_version"].item() == _model_version(env).split("-ft-")[0]
    assert wh.query("SELECT count(*) FROM stage_runs WHERE movie_id = 'hamilton' AND asset = 'finetuned_model'").item() >= 1


def test_analysts_label_clusters_and_later_runs_respect_it(env, capsys):
    """Runs last in this module: it leaves edits behind."""
    wh = _warehouse(env)
    people = wh.query("SELECT cluster, tracks FROM people WHERE movie_id = 'hamilton' ORDER BY tracks DESC, cluster")
    biggest = people["cluster"][0]
    members = wh.query(
        "SELECT track_id FROM latest_clusters WHERE movie_id = 'hamilton' AND cluster = $1 ORDER BY track_id", [int(biggest)]
    )["track_id"].to_list()
    assert len(members) >= 2

    assert main(["label", "name", "hamilton", str(biggest), "The lead", "--note", "test"]) == 0
    assert main(["label", "split", "hamilton", str(members[-1])]) == 0
    assert main(["label", "merge", "hamilton", str(biggest), "999"]) == 2
    assert "has no clusters [999]" in capsys.readouterr().err
    assert main(["label", "name", "hamilton", "999", "Nobody"]) == 2

    def state():
        rows = wh.query("SELECT track_id, cluster, name FROM latest_clusters WHERE movie_id = 'hamilton' ORDER BY track_id")
        return {t: (c, n) for t, c, n in rows.iter_rows()}

    now = state()
    assert all(now[t][1] == "The lead" for t in members[:-1])
    assert now[members[-1]][0] not in (None, biggest) and now[members[-1]][1] is None
    edits = wh.query("SELECT action, tracks, name, note FROM cluster_edits WHERE movie_id = 'hamilton' ORDER BY created_at")
    assert edits["action"].to_list() == ["name", "split"] and edits["note"].to_list() == ["test", None]

    # A later clustering applies the edits again and leaves their table alone.
    assert _recluster().success
    assert state() == now
    assert wh.query("SELECT count(*) FROM cluster_edits").item() == 2
    people = wh.query("SELECT name FROM people WHERE movie_id = 'hamilton' AND name IS NOT NULL")["name"].to_list()
    assert people == ["The lead"]


def test_frames_of_shots_made_without_their_timing_decode_the_video(env):
    # Shots materialised by a release that kept no frame timing: the frame index passes over the video itself.
    # (Last in the module: it adds a run of the frames asset alone.)
    from vcn_assets.assets.preprocess import movie_scan

    before, after = _without_artifact(env, "frame_times.parquet", movie_scan, "frames")
    assert after.equals(before)
    decoded = _warehouse(env).query(
        "SELECT arg_max(frames_decoded, recorded_at) FROM stage_metrics WHERE movie_id = 'hamilton' AND asset = 'frames'"
    ).item()
    assert decoded == before.height


def test_detections_alone_pass_over_the_video_and_find_the_same_faces(env):
    # The one pass made them; materialised alone (a subset of the pass's assets) they take a pass of their own.
    # (Last in the module: it adds a run of the face_detections asset alone.)
    from vcn_assets.assets.preprocess import movie_scan

    table = hamilton_artifact(env, "face_detections.parquet")
    chips = hamilton_artifact(env, "detection_chips.parquet")
    before, chips_before = pl.read_parquet(table), pl.read_parquet(chips)
    assert _materialise_alone([movie_scan], selection=["face_detections"]).success
    assert pl.read_parquet(table).equals(before) and pl.read_parquet(chips).equals(chips_before)
    decoded, details = _warehouse(env).query(
        "SELECT arg_max(frames_decoded, recorded_at), arg_max(details, recorded_at) FROM stage_metrics "
        "WHERE movie_id = 'hamilton' AND asset = 'face_detections'"
    ).row(0)
    assert decoded == 275 and "one_pass" not in json.loads(details)


def test_crops_of_detections_made_without_chips_decode_the_video(env):
    # Detections found by a release that cut no chips: the crops pass over the video, and are the same crops.
    # (Last in the module: it adds a run of the track_crops asset alone.)
    from vcn_assets.assets.preprocess import track_crops

    before, after = _without_artifact(env, "detection_chips.parquet", track_crops, "track_crops")
    assert after.equals(before)
    decoded, details = _warehouse(env).query(
        "SELECT arg_max(frames_decoded, recorded_at), arg_max(details, recorded_at) FROM stage_metrics "
        "WHERE movie_id = 'hamilton' AND asset = 'track_crops'"
    ).row(0)
    assert decoded == 275 and json.loads(details)["cut_from"] == "video"


def test_the_scan_falls_back_to_separate_passes_where_one_cannot_stand_in(env, monkeypatch):
    # With decoding processes the one pass needs the content detector; asked for the adaptive one, the step
    # makes the three assets in their own passes and says why. (Last in the module: it changes the shot detector.)
    import vcn.media.parallel as parallel
    from vcn_assets.assets.preprocess import SCAN_ASSETS, SCAN_OP, movie_scan

    monkeypatch.setenv("VCN_DECODE_WORKERS", "2")
    monkeypatch.setattr(parallel, "SEGMENT_FRAMES", 50)
    result = _materialise_alone([movie_scan], run_config={"ops": {SCAN_OP: {"config": {"detector": "adaptive"}}}})
    assert result.success
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        messages = [event.user_message for event in instance.all_logs(result.run_id)]
    assert any("runs in one process only; finding the shots and faces in separate passes" in m for m in messages)
    decoded = dict(
        _warehouse(env).query(
            "SELECT asset, arg_max(frames_decoded, recorded_at) FROM stage_metrics WHERE movie_id = 'hamilton' "
            "AND asset IN ('shots', 'frames', 'face_detections') GROUP BY asset"
        ).rows()
    )
    assert decoded == {"shots": 275, "frames": 0, "face_detections": 275}
    assert {m.asset_key.to_user_string() for m in result.asset_materializations_for_node(SCAN_OP)} == set(SCAN_ASSETS)
