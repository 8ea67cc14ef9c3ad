"""The inbox sensor and the Dagster definitions as a whole."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from resources import ArtifactStore, MovieRecord, MovieRegistry
from tests.conftest import HAMILTON, REPO
from vcn_assets.partitions import movie_slug, validate_movie_id
from vcn_assets.sensors import inbox_sensor, new_inbox_videos


def test_movie_slug():
    assert movie_slug("The Big Bang Theory, S01E01 (720p).mkv".rsplit(".", 1)[0]) == "the-big-bang-theory-s01e01-720p"
    assert movie_slug("Amélie") == "amelie"
    assert movie_slug("***") == "movie"
    assert "," not in movie_slug("a,b,c")
    assert len(movie_slug("x" * 500)) <= 64


def test_validate_movie_id():
    assert validate_movie_id("bbt_s01e01.v2") == "bbt_s01e01.v2"
    for bad in ("a,b", "", "-x", "a b", "a/b"):
        with pytest.raises(ValueError, match="invalid movie id"):
            validate_movie_id(bad)


def test_new_inbox_videos_skips_known_hidden_and_non_videos(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("My Movie.mp4", "my_movie.mkv", "notes.txt", ".partial.mp4", "Old.mov"):
        (inbox / name).write_bytes(b"x")
    found = new_inbox_videos(inbox, {"old": str(inbox / "Old.mov")})
    assert [(k, Path(p).name) for k, p in found] == [("my-movie", "My Movie.mp4"), ("my-movie-2", "my_movie.mkv")]


def test_inbox_sensor_adds_partitions_and_run_requests(tmp_path, monkeypatch):
    home = tmp_path / "home"
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    monkeypatch.setenv("VCN_HOME", str(home))
    shutil.copy(HAMILTON, inbox / "Hamilton, White House.mp4")
    store = ArtifactStore(base_dir=str(home / "artifacts"))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"store": store})
        result = inbox_sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["hamilton-white-house"]
        (request,) = result.dynamic_partitions_requests
        assert request.partitions_def_name == "movies" and list(request.partition_keys) == ["hamilton-white-house"]
        video = str((inbox / "Hamilton, White House.mp4").resolve())
        # The record `vcn process` writes, stamp included.
        registry = MovieRegistry(store)
        assert registry.record("hamilton-white-house") == MovieRecord("hamilton-white-house", video, registry.stamp(video))
        # A second tick finds nothing new.
        again = inbox_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}))
        assert isinstance(again, dg.SkipReason)


@pytest.mark.slow
def test_reprocessing_an_unchanged_inbox_movie_redoes_nothing(tmp_path, monkeypatch, capsys):
    """The sensor registers a movie as `vcn process` does, so `vcn process` of the same file keeps its run's work."""
    from vcn_assets.artifacts import MOVIE_ASSET_NAMES
    from vcn_assets.assets.models import base_model
    from vcn_assets.cli import main
    from vcn_assets.definitions import build_definitions
    from vcn_assets.settings import Settings

    home = tmp_path / "home"
    (home / "inbox").mkdir(parents=True)
    video = home / "inbox" / "hamilton.mp4"
    shutil.copy(HAMILTON, video)
    monkeypatch.setenv("VCN_HOME", str(home))
    for variable in ("DAGSTER_HOME", "VCN_INBOX", "VCN_STORAGE"):
        monkeypatch.delenv(variable, raising=False)
    defs = build_definitions(Settings.from_env().prepare())

    def materialisations(instance: dg.DagsterInstance) -> dict[str, int]:
        return {
            name: len(instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=["hamilton"]), limit=10
            ).records)
            for name in MOVIE_ASSET_NAMES
        }

    with dg.DagsterInstance.get() as instance:
        assert dg.materialize([base_model], instance=instance, resources=defs.resources).success
        tick = inbox_sensor(dg.build_sensor_context(instance=instance, resources=defs.resources))
        (request,) = tick.run_requests
        assert request.partition_key == "hamilton"
        instance.add_dynamic_partitions("movies", ["hamilton"])
        # The run the daemon launches for the request.
        run = defs.resolve_job_def("process_movie").execute_in_process(
            instance=instance, partition_key=request.partition_key, tags=request.tags
        )
        assert run.success
        assert materialisations(instance) == {name: 1 for name in MOVIE_ASSET_NAMES}

    assert main(["process", str(video)]) == 0
    out = capsys.readouterr().out
    assert f"kept (current): {', '.join(MOVIE_ASSET_NAMES)}" in out and "every asset of the movie is current" in out
    assert f"(run {run.run_id})" in out  # the summary of the sensor-launched run
    with dg.DagsterInstance.get() as instance:
        assert materialisations(instance) == {name: 1 for name in MOVIE_ASSET_NAMES}


def test_definitions_load_with_every_asset_and_check():
    from vcn_assets.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys == {
        "shots", "frames", "face_detections", "face_tracks", "track_crops", "base_model", "finetuned_model", "track_embeddings", "face_clusters"
    }
    job = defs.resolve_job_def("process_movie")
    assert job.partitions_def is not None and job.partitions_def.name == "movies"
    assert {s.name for s in defs.sensors} == {"inbox_sensor", "model_update_sensor"}
    assert {s.name for s in defs.schedules} == {"weekly_recluster"}
    assert defs.resolve_job_def("recluster_movie").partitions_def.name == "movies"


@pytest.mark.slow
def test_dagster_definitions_validate(tmp_path):
    env = dict(os.environ, VCN_HOME=str(tmp_path), DAGSTER_HOME=str(tmp_path))
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


@pytest.mark.parametrize("config", ["dagster.yaml", "deploy/dagster.production.yaml"])
def test_instance_configurations_match_dagsters_schema(config):
    """The local default and the documented production instance are valid dagster.yaml files."""
    import yaml
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config_schema

    data = yaml.safe_load((REPO / config).read_text())
    result = validate_config(dagster_instance_config_schema(), data)
    assert result.success, [e.message for e in result.errors or []]
    if "production" in config:
        assert data["storage"]["postgres"] and data["run_launcher"]["class"] == "K8sRunLauncher"
        assert "VCN_STORAGE" in data["run_launcher"]["config"]["env_vars"]
        assert data["concurrency"]["pools"]["granularity"] == "op"


def test_accelerator_steps_share_the_gpu_pool():
    from vcn_assets.definitions import defs
    from vcn_assets.jobs import GPU_POOL

    keys = ("face_detections", "finetuned_model", "track_embeddings", "face_tracks")
    pools = {key: defs.resolve_assets_def(key).node_def.pool for key in keys}
    assert pools == {"face_detections": GPU_POOL, "finetuned_model": GPU_POOL, "track_embeddings": GPU_POOL, "face_tracks": None}
    # The shots and the frame index come from the detection's own pass over the video, in the same step.
    assert defs.resolve_assets_def("shots") is defs.resolve_assets_def("face_detections")
