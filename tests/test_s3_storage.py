"""Artifacts and the inbox in S3, against a local S3 server (moto in server mode on 127.0.0.1).

The servers are real processes speaking the S3 HTTP API; the platform reaches
them through boto3 exactly as it reaches AWS, with only
``AWS_ENDPOINT_URL`` pointing elsewhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import dagster as dg
import polars as pl
import pytest

from resources import ArtifactStore, MovieRegistry
from tests.conftest import HAMILTON
from vcn.stores.objectstore import StorageError
from vcn.stores.warehouse import Warehouse
from vcn_assets.cli import main

BUCKET = "vcn-test"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env_extra or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the moto S3 server exited at start")
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the moto S3 server did not start within 30 s")


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for this module (any credentials accepted)."""
    process, url = _start_moto()
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """The standard AWS environment pointed at the local server, and a fresh bucket; yields a boto3 client."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    for bucket in client.list_buckets()["Buckets"]:
        objects = client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", [])
        for item in objects:
            client.delete_object(Bucket=bucket["Name"], Key=item["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    client.create_bucket(Bucket=BUCKET)
    return client


def _keys(client, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _store(base: Path, prefix: str = "vcn") -> ArtifactStore:
    return ArtifactStore(base_dir=str(base), storage_uri=f"s3://{BUCKET}/{prefix}")


# --- the store ------------------------------------------------------------------------------


def test_store_writes_to_s3_and_other_machines_read_the_current_version(s3, tmp_path):
    one, two = _store(tmp_path / "one"), _store(tmp_path / "two")
    path = one.write_parquet("m", "t.parquet", pl.DataFrame({"x": [1, 2]}))
    assert path == f"s3://{BUCKET}/vcn/movies/m/t.parquet"
    assert "vcn/movies/m/t.parquet" in _keys(s3)
    assert two.read_parquet("m", "t.parquet")["x"].to_list() == [1, 2]  # downloaded into the second cache
    one.write_parquet("m", "t.parquet", pl.DataFrame({"x": [3]}))
    assert two.read_parquet("m", "t.parquet")["x"].to_list() == [3]  # the changed object is fetched again
    assert two.exists("m", "t.parquet") and not two.exists("m", "other.parquet")
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/vcn/movies/m/other.parquet"):
        two.read_parquet("m", "other.parquet")


def test_a_failed_upload_leaves_the_previous_file_in_s3_and_in_the_cache(s3, tmp_path, monkeypatch):
    store = _store(tmp_path / "cache")
    store.write_parquet("m", "t.parquet", pl.DataFrame({"x": [1]}))

    def refuse(*args, **kwargs):
        raise StorageError("s3://x", "connection lost")

    monkeypatch.setattr(store.remote, "upload", refuse)
    with pytest.raises(StorageError, match="connection lost"):
        store.write_parquet("m", "t.parquet", pl.DataFrame({"x": [2]}))
    assert pl.read_parquet(store.path("m", "t.parquet"))["x"].to_list() == [1]
    assert _store(tmp_path / "fresh").read_parquet("m", "t.parquet")["x"].to_list() == [1]
    assert not [p for p in store.movie_dir("m").iterdir() if p.name.endswith(".partial")]


def test_model_store_registry_and_movie_sources_in_s3(s3, tmp_path):
    store = _store(tmp_path / "cache")
    store.write_model_json("base_model.json", {"name": "dlib-resnet", "version": "v1"})
    assert store.read_model_json("base_model.json")["version"] == "v1"
    assert _store(tmp_path / "other").read_model_json("base_model.json")["version"] == "v1"
    s3.put_object(Bucket=BUCKET, Key="inbox/b.mp4", Body=b"b")
    video = tmp_path / "a.mp4"
    video.write_bytes(b"a")
    MovieRegistry(store).register("a", str(video))
    MovieRegistry(store).register("b", f"s3://{BUCKET}/inbox/b.mp4")
    other = MovieRegistry(_store(tmp_path / "other"))
    assert other.sources() == {"a": str(video), "b": f"s3://{BUCKET}/inbox/b.mp4"}
    assert other.record("b").stamp == {"etag": s3.head_object(Bucket=BUCKET, Key="inbox/b.mp4")["ETag"].strip('"')}

    from resources import BackboneResource

    assert BackboneResource(registry=store.model_uri("base_model.json")).choice() == ("dlib-resnet", None)


def test_a_missing_bucket_is_a_clear_error(s3, tmp_path):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        ArtifactStore(base_dir=str(tmp_path), storage_uri="s3://no-such-bucket/vcn").check()


def test_rejected_credentials_are_a_clear_error(tmp_path, monkeypatch):
    process, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this server checks credentials
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
        with pytest.raises(StorageError, match="S3 rejected the credentials \\(InvalidAccessKeyId\\)"):
            _store(tmp_path).check()
        monkeypatch.setenv("VCN_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("VCN_STORAGE", f"s3://{BUCKET}/vcn")
        monkeypatch.delenv("DAGSTER_HOME", raising=False)
        assert main(["process", str(HAMILTON), "--movie-id", "hamilton"]) == 2
        assert not (tmp_path / "home" / "warehouse.duckdb").exists()
        assert not (tmp_path / "home" / "artifacts" / "movies").exists()
    finally:
        process.terminate()
        process.wait(10)


# --- the inbox ------------------------------------------------------------------------------


def test_inbox_sensor_on_an_s3_prefix(s3, tmp_path, monkeypatch):
    from vcn_assets.sensors import inbox_sensor

    monkeypatch.setenv("VCN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VCN_INBOX", f"s3://{BUCKET}/inbox/")
    s3.upload_file(str(HAMILTON), BUCKET, "inbox/Hamilton, White House.mp4")
    for key in ("inbox/notes.txt", "inbox/.uploading.mp4", "inbox/archive/old.mp4"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    store = _store(tmp_path / "cache")
    with dg.instance_for_test() as instance:
        result = inbox_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}))
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["hamilton-white-house"]
        (request,) = result.dynamic_partitions_requests
        assert list(request.partition_keys) == ["hamilton-white-house"]
        uri = f"s3://{BUCKET}/inbox/Hamilton, White House.mp4"
        registry = MovieRegistry(store)
        assert registry.record("hamilton-white-house").stamp == registry.stamp(uri)  # what `vcn process` records
        assert registry.source("hamilton-white-house") == uri
        local = Path(registry.local_source("hamilton-white-house"))
        assert local.read_bytes() == HAMILTON.read_bytes()
        again = inbox_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}))
        assert isinstance(again, dg.SkipReason)


def test_an_s3_object_that_is_not_a_video_fails_its_run_clearly_and_writes_nothing(s3, tmp_path, monkeypatch):
    from resources import BackboneResource, DetectorResource, WarehouseResource
    from vcn_assets.assets.preprocess import movie_scan

    monkeypatch.setenv("VCN_HOME", str(tmp_path / "home"))
    s3.put_object(Bucket=BUCKET, Key="inbox/broken.mp4", Body=os.urandom(50_000))
    store = _store(tmp_path / "cache")
    MovieRegistry(store).register("broken", f"s3://{BUCKET}/inbox/broken.mp4")
    warehouse = WarehouseResource(path=str(tmp_path / "wh.duckdb"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("movies", ["broken"])
        resources = {
            "store": store, "warehouse": warehouse, "detector": DetectorResource(),
            "backbone": BackboneResource(),
        }
        result = dg.materialize(
            [movie_scan], partition_key="broken", instance=instance, resources=resources, raise_on_error=False,
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    while failure.cause is not None:
        failure = failure.cause
    assert f"s3://{BUCKET}/inbox/broken.mp4" in failure.message and "NotAVideoError" in failure.cls_name
    assert _keys(s3, "vcn/movies/broken/") == {"vcn/movies/broken/movie.json"}

    # `vcn process` of the same object refuses it before registering anything.
    monkeypatch.setenv("VCN_STORAGE", f"s3://{BUCKET}/other")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["process", f"s3://{BUCKET}/inbox/broken.mp4"]) == 2
    assert _keys(s3, "other/") == set()


# --- a whole run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_vcn_process_with_every_artifact_in_s3(s3, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("VCN_STORAGE", f"s3://{BUCKET}/vcn")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    s3.upload_file(str(HAMILTON), BUCKET, "videos/hamilton.mp4")
    # dlib's ResNet, which a CPU finetunes: the movie's checkpoint goes to the S3 model store too.
    assert main(["model", "register", "--name", "dlib-resnet"]) == 0
    assert main(["process", f"s3://{BUCKET}/videos/hamilton.mp4"]) == 0
    assert "clusters:" in capsys.readouterr().out

    keys = _keys(s3, "vcn/")
    movie = "vcn/movies/hamilton/"
    for name in (
        "movie.json", "shots.parquet", "frames.parquet", "face_detections.parquet", "face_tracks.parquet", "tracks.parquet",
        "track_crops.parquet", "finetuned_model.json", "crop_embeddings.npy", "crop_embeddings.parquet",
        "track_embeddings.parquet", "face_clusters.parquet", "clusters_report/report.html", "clusters_report/contact_sheet.png",
    ):
        assert movie + name in keys, name
    assert "vcn/models/base_model.json" in keys
    assert any(k.startswith("vcn/models/finetuned/hamilton/") and k.endswith(".safetensors") for k in keys)
    thumbnails = {k for k in keys if k.startswith(movie + "thumbnails/")}
    assert thumbnails

    # The warehouse points analysts at S3.
    wh = Warehouse(str(home / "warehouse.duckdb"))
    shown = wh.query("SELECT thumbnail FROM track_clusters WHERE movie_id = 'hamilton' AND thumbnail IS NOT NULL")
    assert shown.height == len(thumbnails) and all(t.startswith(f"s3://{BUCKET}/{movie}") for t in shown["thumbnail"])
    artifacts = wh.query("SELECT artifact FROM lineage WHERE movie_id = 'hamilton' AND artifact IS NOT NULL")["artifact"]
    assert all(a.startswith(f"s3://{BUCKET}/vcn/") for a in artifacts)

    # Another machine (an empty cache) reads the results from S3 alone.
    monkeypatch.setenv("VCN_HOME", str(tmp_path / "elsewhere"))
    out = tmp_path / "export"
    assert main(["export", "hamilton", "--out", str(out)]) == 0
    clusters = pl.read_csv(out / "clusters.csv")
    assert clusters.height == pl.read_parquet(home / "artifacts" / "movies" / "hamilton" / "face_clusters.parquet").height
