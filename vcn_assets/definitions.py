"""The platform's Dagster definitions, assembled in one place."""

from __future__ import annotations

import dagster as dg

from resources import (
    ArtifactStore,
    BackboneResource,
    ClusteringResource,
    DetectorResource,
    WarehouseResource,
)
from vcn_assets import artifacts
from vcn_assets.assets.clusters import cluster_assets
from vcn_assets.assets.models import model_assets
from vcn_assets.assets.preprocess import preprocess_assets
from vcn_assets.checks import checks
from vcn_assets.jobs import process_movie_job, recluster_movie_job
from vcn_assets.sensors import inbox_sensor, model_update_sensor, weekly_recluster
from vcn_assets.settings import Settings


def build_resources(settings: Settings) -> dict:
    """The resources of one environment (local folders, or S3 when ``settings.storage`` is set), by resource key."""
    store = ArtifactStore(base_dir=str(settings.artifacts), storage_uri=settings.storage)
    return {
        "store": store,
        "warehouse": WarehouseResource(path=str(settings.warehouse)),
        "detector": DetectorResource(),
        "backbone": BackboneResource(registry=store.model_uri(artifacts.BASE_MODEL)),
        "clustering": ClusteringResource(),
    }


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    return dg.Definitions(
        assets=[*preprocess_assets, *model_assets, *cluster_assets],
        asset_checks=checks,
        jobs=[process_movie_job, recluster_movie_job],
        sensors=[inbox_sensor, model_update_sensor],
        schedules=[weekly_recluster],
        resources=build_resources(settings),
    )


defs = build_definitions()
