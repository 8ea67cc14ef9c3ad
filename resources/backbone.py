"""The face-ID backbone as a Dagster resource."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
from pydantic import Field


class BackboneResource(dg.ConfigurableResource):
    """Which pretrained face-ID model embeds the crops, and where it runs.

    The model is, in order: the ``name``/``checkpoint`` set on the resource; else
    the model registered last (``vcn model register``, the ``base_model`` asset,
    recorded in ``registry``); else dlib's ResNet descriptor (CC0), ported to
    torch and read from the installed ``face-recognition-models`` package: no
    download, no licence question. ArcFace-style iresnet checkpoints and ONNX
    recognisers plug in by name and checkpoint path (local or ``s3://``).
    """

    name: str | None = Field(
        default=None, description="Backbone: dlib-resnet, iresnet18/34/50/100 or onnx; None: the registered model."
    )
    checkpoint: str | None = Field(default=None, description="Checkpoint path or s3:// URI (required except for dlib-resnet).")
    registry: str | None = Field(
        default=None, description="The model registry's record of the current base model (base_model.json)."
    )
    device: str | None = Field(default=None, description="'cpu', 'cuda' or None to use CUDA when present.")
    batch_size: int = Field(default=256, description="Crops per forward pass.")

    def choice(self) -> tuple[str, str | None]:
        """(name, checkpoint) of the model this resource loads."""
        if self.name is not None:
            return self.name, self.checkpoint
        if self.registry and Path(self.registry).is_file():
            record = json.loads(Path(self.registry).read_text())
            return record["name"], record.get("checkpoint")
        return "dlib-resnet", self.checkpoint

    def load(self):
        from vcn.backbone import load_backbone

        name, checkpoint = self.choice()
        return load_backbone(name, checkpoint=checkpoint, device=self.device)
