"""Dagster resources of the platform: artifact store, warehouse, detector, settings."""

from resources.artifact_store import ArtifactStore
from resources.detector import DetectorResource
from resources.warehouse import WarehouseResource

__all__ = ["ArtifactStore", "DetectorResource", "WarehouseResource"]
