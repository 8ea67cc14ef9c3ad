"""The assets' bounded crop samples on the Hamilton clip through `vcn process`: finetuning records
how many crops it used, and the loss-metric clustering (its logits kept by track_embeddings) gives
the clustering of all crops under its cap and still clusters every track above it."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.conftest import hamilton_artifact, processed_hamilton

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from processed_hamilton(tmp_path_factory, backbone="dlib-resnet")


def _recluster(similarity: str = "cosine"):
    """Re-embeds and re-clusters hamilton by ``similarity``, as the recluster job does (the two assets share it)."""
    import dagster as dg

    from resources import ClusteringResource
    from vcn_assets.assets.clusters import face_clusters
    from vcn_assets.assets.models import track_embeddings
    from vcn_assets.definitions import build_resources
    from vcn_assets.settings import Settings

    resources = {**build_resources(Settings.from_env()), "clustering": ClusteringResource(similarity=similarity)}
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [track_embeddings, face_clusters], partition_key="hamilton", instance=instance, resources=resources
        )
    assert result.success
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "face_clusters"]
    return pl.read_parquet(hamilton_artifact(Settings.from_env().home, "face_clusters.parquet")).sort("track_id"), event


def _same_partition(a: list, b: list) -> bool:
    """Whether two labellings group the items alike (None: Unknown, kept as is)."""
    pairs = set(zip(a, b))
    return all((x is None) == (y is None) for x, y in pairs) and len(pairs) == len(set(a)) == len(set(b))


def test_finetuning_records_the_crops_it_used(env):
    from vcn.identity.selfsup.adapt import MAX_CROPS

    record = json.loads(hamilton_artifact(env, "finetuned_model.json").read_text())
    kept = pl.read_parquet(hamilton_artifact(env, "track_crops.parquet")).filter(~pl.col("rejected")).height
    assert record["finetune_crops"] == kept < MAX_CROPS  # a short clip finetunes on all its crops
    assert record["max_finetune_crops"] == MAX_CROPS


def test_loss_metric_under_its_cap_clusters_all_crops(env):
    import vcn
    from vcn.clustering.cannot_link import on_screen_together
    from vcn.clustering.parameter_free import cluster_movie
    from vcn.identity.embeddings import read_kept_chips
    from vcn.identity.selfsup.finetune import load_finetuned

    clusters, event = _recluster(similarity="loss")
    assert event.materialization.metadata["dissimilarity"].value == "loss"
    crops = pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))
    assert event.materialization.metadata["crops_compared"].value == crops.height
    # The reference: the loss metric on the logits of every kept crop at once.
    record = json.loads(hamilton_artifact(env, "finetuned_model.json").read_text())
    finetuned = load_finetuned(record["checkpoint"], vcn.load_backbone("dlib-resnet", device="cpu"))
    _, chips = read_kept_chips(hamilton_artifact(env, "track_crops.parquet"), finetuned.backbone.template)
    tracks = pl.read_parquet(hamilton_artifact(env, "tracks.parquet")).sort("track_id")
    crop_track = np.searchsorted(tracks["track_id"].to_numpy(), crops["track_id"].to_numpy())
    expected = cluster_movie(
        finetuned.logits(chips), crop_track, tracks.height, cannot_link=on_screen_together(tracks),
        crop_quality=crops["quality"].to_numpy(), dissimilarity=finetuned.loss_dissimilarity(),
    )
    labels = [None if c < 0 else int(c) for c in expected.labels]
    assert _same_partition(clusters["auto_cluster"].to_list(), labels)


def test_loss_metric_over_its_cap_still_clusters_every_track(env, monkeypatch):
    import vcn.identity.selfsup.loss_metric as loss_metric

    full, _ = _recluster(similarity="loss")
    crops = pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))
    monkeypatch.setattr(loss_metric, "MAX_CROPS", 20)
    capped, event = _recluster(similarity="loss")
    compared = event.materialization.metadata["crops_compared"].value
    assert compared <= max(20, crops["track_id"].n_unique()) < crops.height
    # Every track keeps its quality verdict (judged on all its crops) and a cluster unless low-quality.
    assert capped["low_quality"].to_list() == full["low_quality"].to_list()
    assert capped["cluster"].is_null().to_list() == full["cluster"].is_null().to_list()


def test_a_model_that_stepped_aside_leaves_the_movie_to_the_pretrained_one(env):
    """finetuned_model.json's ``stepped_aside`` (the label-free check found no gain) makes the pretrained
    model embed the movie; the loss metric, the finetuned model's own, still uses the checkpoint."""
    path = hamilton_artifact(env, "finetuned_model.json")
    original = path.read_text()
    record = json.loads(original)
    assert record["stepped_aside"] is None and record["check"] is not None  # 14 tracks: too few to judge
    try:
        path.write_text(json.dumps({**record, "stepped_aside": "no better than the pretrained model (test)"}))
        _recluster()
        version = pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))["model_version"].unique().to_list()
        assert version == [record["base_version"]]
        _recluster(similarity="loss")
        version = pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))["model_version"].unique().to_list()
        assert version == [record["version"]]
    finally:
        path.write_text(original)
        _recluster()
    assert pl.read_parquet(hamilton_artifact(env, "crop_embeddings.parquet"))["model_version"].unique().to_list() == [
        record["version"]
    ]
