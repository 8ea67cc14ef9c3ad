"""Faults: a run killed mid-stage resumes where it stopped, and two movies processed at once stay apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from tests.conftest import HAMILTON
from vcn.stores.warehouse import Warehouse
from vcn_assets.artifacts import MOVIE_ASSET_NAMES, MOVIE_ASSETS
from vcn_assets.cli import main
from vcn_assets.resume import ResumePlan

pytestmark = pytest.mark.slow

VCN = str(Path(sys.executable).with_name("vcn"))


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    return env | {"VCN_HOME": str(home)}


def _materialisations(movie: str) -> dict[str, int]:
    with dg.DagsterInstance.get() as instance:
        return {
            name: len(
                instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[movie]), limit=10
                ).records
            )
            for name in MOVIE_ASSET_NAMES
        }


def _visible_files_are_complete(folder: Path) -> None:
    """Every file under its real name is whole: the Parquet files parse, nothing visible is a leftover."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        assert not path.name.endswith((".partial", ".tmp", ".download")), path
        if path.suffix == ".parquet":
            pl.read_parquet(path)


def test_a_killed_run_resumes_from_its_last_completed_asset(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    movie_dir = home / "artifacts" / "movies" / "h"
    video = tmp_path / "clip.mp4"
    video.write_bytes(HAMILTON.read_bytes())
    process = subprocess.Popen([VCN, "process", str(video), "--movie-id", "h"], env=_env(home),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # tracks.parquet appears once face_detections is recorded complete and face_tracks is under way.
        while not (movie_dir / "tracks.parquet").exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "face_tracks never wrote its tracks"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # mid-run: no chance to clean up
    finally:
        process.wait(30)
    assert not (movie_dir / "face_clusters.parquet").exists()
    _visible_files_are_complete(movie_dir)

    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    before = _materialisations("h")
    done = [name for name in MOVIE_ASSET_NAMES if before[name]]
    assert done[:3] == ["shots", "frames", "face_detections"] and "face_clusters" not in done

    assert main(["process", str(video), "--movie-id", "h"]) == 0
    out = capsys.readouterr().out
    assert "was interrupted (its process is gone): marked as failed" in out
    assert f"kept (current): {', '.join(done)}; resuming at " in out
    # Every asset materialised exactly once over both runs: nothing finished was redone.
    assert _materialisations("h") == {name: 1 for name in MOVIE_ASSET_NAMES}
    _visible_files_are_complete(movie_dir)
    with dg.DagsterInstance.get() as instance:
        statuses = sorted(r.status.value for r in instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "h"})))
    assert statuses == ["FAILURE", "SUCCESS"]

    # A third call has nothing to do; after the video changed, everything is processed again.
    assert main(["process", str(video), "--movie-id", "h"]) == 0
    assert "every asset of the movie is current" in capsys.readouterr().out
    assert _materialisations("h") == {name: 1 for name in MOVIE_ASSET_NAMES}
    os.utime(video, ns=(time.time_ns(), time.time_ns() + 10**9))  # re-encoded in place, say
    assert main(["process", str(video), "--movie-id", "h"]) == 0
    captured = capsys.readouterr()
    assert "kept (current)" not in captured.out
    assert _materialisations("h") == {name: 2 for name in MOVIE_ASSET_NAMES}
    # Its output is not a terminal: each stage's progress came as plain lines, the last one per loop saying done.
    # One pass decodes the video for the shots, the frame index and the detector.
    assert "shots: frames decoded 275 / 275 frames (100.0 %), " in captured.err
    assert "face_detections: frames decoded" not in captured.err
    assert "track_embeddings: crops embedded " in captured.err and ", done (" in captured.err


def test_resume_plans(tmp_path):
    """What is kept and what runs, from the instance's materialisation records and the store's files."""
    from resources import ArtifactStore
    from vcn_assets.resume import plan

    names = list(MOVIE_ASSET_NAMES)
    store = ArtifactStore(base_dir=str(tmp_path))

    def materialised(instance, asset, code="1", partition="m"):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=asset, partition=partition, tags={"dagster/code_version": code})
        )
        artifact = {a.name: a.artifact for a in MOVIE_ASSETS}.get(asset)
        if artifact:
            with store.writing(partition, artifact) as tmp:
                tmp.write_bytes(b"x")

    with dg.instance_for_test() as instance:
        assert plan(instance, store, "m", code_version="1") == ResumePlan([], names, "first run")
        materialised(instance, "shots")
        materialised(instance, "frames")
        assert plan(instance, store, "m", code_version="1") == ResumePlan(
            names[:2], names[2:], "face_detections was never materialised"
        )
        assert plan(instance, store, "m", code_version="2").run == names
        assert plan(instance, store, "m", code_version="1", force=True) == ResumePlan([], names, "--force")
        assert plan(instance, store, "m", code_version="1", video_changed=True).run == names
        assert plan(instance, store, "other", code_version="1").run == names
        store.path("m", "frames.parquet").unlink()
        assert plan(instance, store, "m", code_version="1").kept == ["shots"]
        materialised(instance, "frames")
        for name in names[2:]:
            materialised(instance, name)
        assert plan(instance, store, "m", code_version="1") == ResumePlan(names, [], "every asset is current")
        materialised(instance, "shots")  # redone after the others: everything after it is older
        assert plan(instance, store, "m", code_version="1") == ResumePlan(["shots"], names[1:], "frames is older than shots")
        for name in names[1:]:
            materialised(instance, name)
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="base_model"))
        assert plan(instance, store, "m", code_version="1") == ResumePlan(
            names[:5], names[5:], "a new base model was registered"
        )


def test_two_movies_processed_at_once_stay_apart(tmp_path):
    home = tmp_path / "home"
    processes = {
        movie: subprocess.Popen([VCN, "process", str(HAMILTON), "--movie-id", movie], env=_env(home),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for movie in ("one", "two")
    }
    outputs = {movie: p.communicate(timeout=900)[0] for movie, p in processes.items()}
    for movie, p in processes.items():
        assert p.returncode == 0, outputs[movie]
    wh = Warehouse(str(home / "warehouse.duckdb"))
    for movie in processes:
        folder = home / "artifacts" / "movies" / movie
        _visible_files_are_complete(folder)
        for table, artifact in (("tracks", "tracks.parquet"), ("face_clusters", "face_clusters.parquet"),
                                ("track_crops", "track_crops.parquet")):
            rows = wh.query(f"SELECT count(*) FROM {table} WHERE movie_id = $1", [movie]).item()
            assert rows == pl.read_parquet(folder / artifact).height > 0, (movie, table)
    # The same clip gives the same tracks whichever process ran it.
    one, two = (pl.read_parquet(home / "artifacts" / "movies" / m / "tracks.parquet") for m in ("one", "two"))
    assert one.equals(two)
    assert wh.query("SELECT count(*) FROM models").item() == 1
