"""A new install's default pipeline on a CPU, end to end on the Hamilton clip.

The default base model is SFace (:data:`vcn.identity.backbone.DEFAULT_BACKBONE`). On a CPU it is
not finetuned (:data:`vcn.identity.backbone.NOT_FINETUNED_ON_CPU`): the movie is embedded by the
pretrained model, and the record, the asset metadata and the warehouse say why.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.conftest import hamilton_artifact, processed_hamilton
from vcn.identity.backbone import DEFAULT_BACKBONE, NOT_FINETUNED_ON_CPU, TEMPLATES
from vcn.stores.warehouse import Warehouse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from processed_hamilton(tmp_path_factory)


def test_the_default_is_sface_and_embeds_the_movie(env):
    assert DEFAULT_BACKBONE == "sface"
    registered = json.loads((env / "artifacts" / "models" / "base_model.json").read_text())
    assert registered["name"] == "sface" and registered["template"] == TEMPLATES["sface"] == "arcface-112"
    crops = pl.read_parquet(hamilton_artifact(env, "track_crops.parquet"), columns=["template"])
    assert crops["template"].unique().to_list() == ["arcface-112"]
    embedded = pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))
    matrix = np.load(hamilton_artifact(env, "crop_embeddings.npy"))
    # Embedded by the pretrained model itself, which scores SER-FIQ quality too.
    assert embedded["model_version"].unique().to_list() == [registered["version"]]
    assert registered["version"].startswith("sface-")
    assert matrix.shape == (embedded.height, 128) and np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    assert embedded["quality"].null_count() == 0
    clusters = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet"))
    assert clusters["cluster"].drop_nulls().n_unique() >= 2


def test_a_cpu_does_not_finetune_sface_and_says_why(env):
    import dagster as dg

    record = json.loads(hamilton_artifact(env, "finetuned_model.json").read_text())
    assert not record["enabled"] and record["version"] == record["base_version"]
    assert record["reason"] == f"not finetuned on a CPU: {NOT_FINETUNED_ON_CPU['sface']}"
    assert "CUDA" in record["reason"]
    with dg.DagsterInstance.get() as instance:
        (latest,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("finetuned_model"), asset_partitions=["hamilton"]), limit=1
        ).records
    assert latest.asset_materialization.metadata["skipped"].value == record["reason"]
    wh = Warehouse(str(env / "warehouse.duckdb"))
    details = wh.query(
        "SELECT details FROM stage_metrics WHERE movie_id = 'hamilton' AND asset = 'finetuned_model'"
    )["details"].to_list()
    assert details and json.loads(details[-1])["reason"] == record["reason"]
    lineage = wh.query("SELECT finetuned, base_model_version FROM clustering_lineage WHERE movie_id = 'hamilton'")
    assert lineage["finetuned"].to_list() == [False]
    assert lineage["base_model_version"].item() == record["base_version"]


def test_the_movie_path_and_cluster_tracks_give_the_same_clusters(env, monkeypatch):
    """The same chips, tracks and model through ``vcn cluster-tracks``' pipeline and through the assets: one
    partition, one set of Unknown tracks, so that track-dataset benchmarks speak for movies."""
    import vcn
    import vcn.cluster_tracks as cluster_tracks
    from vcn.pipeline import ChipArray, CropFile

    tracks = pl.read_parquet(hamilton_artifact(env, "tracks.parquet")).sort("track_id")
    model = vcn.load_backbone(device="cpu")
    source = CropFile.open(hamilton_artifact(env, "track_crops.parquet"), model.template, tracks["track_id"].to_numpy())
    chips = np.concatenate(list(source.chunks(100_000)))
    table = tracks.select(
        pl.col("track_id").cast(pl.String), pl.col("shot_id").cast(pl.String), "start_frame", "end_frame"
    )
    aligned = cluster_tracks.AlignedTrackset(
        tracks=table, problems=[], chips=ChipArray(chips, np.asarray(source.crop_track)),
        crops_by_method={"detected": len(chips)}, thumbnails={}, backbone=model, timings={},
    )
    monkeypatch.setattr(cluster_tracks, "align_trackset", lambda *args, **kwargs: aligned)
    result = cluster_tracks.cluster_trackset(env)

    movie = pl.read_parquet(hamilton_artifact(env, "face_clusters.parquet")).sort("track_id")
    assert [str(t) for t in movie["track_id"].to_list()] == result.track_ids
    assert result.model_version == json.loads(hamilton_artifact(env, "finetuned_model.json").read_text())["version"]
    movie_clusters = movie["auto_cluster"].to_list()
    assert [c is None for c in movie_clusters] == [c is None for c in result.clusters]
    pairs = {(a, b) for a, b in zip(movie_clusters, result.clusters) if a is not None}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # one-to-one
