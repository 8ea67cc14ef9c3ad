"""Dagster resources of the platform: artifact store, movie registry, warehouse, detector, backbone."""

from resources.artifact_store import ArtifactStore
from resources.backbone import BackboneResource
from resources.clustering import ClusteringResource
from resources.detector import DetectorResource
from resources.movie_registry import MovieRecord, MovieRegistry
from resources.warehouse import WarehouseResource

__all__ = ["ArtifactStore", "BackboneResource", "ClusteringResource", "DetectorResource", "MovieRecord", "MovieRegistry", "WarehouseResource"]
