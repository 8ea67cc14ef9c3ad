"""Dagster resources of the platform: artifact store, warehouse, detector, backbone."""

from resources.artifact_store import ArtifactStore
from resources.backbone import BackboneResource
from resources.detector import DetectorResource
from resources.warehouse import WarehouseResource

__all__ = ["ArtifactStore", "BackboneResource", "DetectorResource", "WarehouseResource"]
