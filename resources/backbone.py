"""The face-ID backbone as a Dagster resource."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class BackboneResource(dg.ConfigurableResource):
    """Which pretrained face-ID model embeds the crops, and where it runs.

    The default is dlib's ResNet descriptor (CC0), ported to torch and read from
    the installed ``face-recognition-models`` package: no download, no licence
    question. ArcFace-style iresnet checkpoints and ONNX recognisers plug in by
    name and checkpoint path (local or ``s3://``).
    """

    name: str = Field(default="dlib-resnet", description="Backbone: dlib-resnet, iresnet18/34/50/100 or onnx.")
    checkpoint: str | None = Field(default=None, description="Checkpoint path or s3:// URI (required except for dlib-resnet).")
    device: str | None = Field(default=None, description="'cpu', 'cuda' or None to use CUDA when present.")
    batch_size: int = Field(default=256, description="Crops per forward pass.")

    def load(self):
        from vcn.backbone import load_backbone

        return load_backbone(self.name, checkpoint=self.checkpoint, device=self.device)
