"""The face-ID backbone as a Dagster resource."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from vcn.stores.objectstore import S3Objects, is_s3_uri, s3_client, split_s3_uri


class BackboneResource(dg.ConfigurableResource):
    """Which pretrained face-ID model embeds the crops, and where it runs.

    The model is, in order: the ``name``/``checkpoint`` set on the resource; else
    the model registered last (``vcn model register``, the ``base_model`` asset,
    recorded in ``registry``); else a new install's default
    (:data:`vcn.identity.backbone.DEFAULT_BACKBONE`), whose weights ship in an
    installed package: no download. ArcFace-style iresnet checkpoints and ONNX
    recognisers plug in by name and checkpoint path (local or ``s3://``).
    """

    name: str | None = Field(
        default=None, description="Backbone: dlib-resnet, sface, iresnet18/34/50/100 or onnx; None: the registered model."
    )
    checkpoint: str | None = Field(default=None, description="Checkpoint path or s3:// URI (optional for dlib-resnet and sface, whose weights ship in packages).")
    registry: str | None = Field(
        default=None, description="The model registry's record of the current base model (base_model.json; a path or s3:// URI)."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint of an s3:// registry or checkpoint; None: AWS_ENDPOINT_URL or AWS."
    )
    s3_region: str | None = Field(default=None, description="S3 region; None: AWS_REGION / AWS_DEFAULT_REGION.")
    device: str | None = Field(default=None, description="'cpu', 'cuda' or None to use CUDA when present.")
    batch_size: int = Field(default=256, description="Crops per forward pass.")

    def choice(self) -> tuple[str, str | None]:
        """(name, checkpoint) of the model this resource loads."""
        if self.name is not None:
            return self.name, self.checkpoint
        record = self.registered()
        if record is not None:
            return record["name"], record.get("checkpoint")
        from vcn.identity.backbone import DEFAULT_BACKBONE

        return DEFAULT_BACKBONE, self.checkpoint

    def template(self) -> str:
        """The alignment template of the model this resource loads, without loading it."""
        from vcn.identity.backbone import TEMPLATES

        if self.name is None:
            record = self.registered()
            if record is not None and record.get("template"):
                return record["template"]
        return TEMPLATES[self.choice()[0]]

    def registered(self) -> dict | None:
        """The registry's record of the current base model, if one was registered."""
        if not self.registry:
            return None
        if is_s3_uri(self.registry):
            bucket, key = split_s3_uri(self.registry)
            data = S3Objects(self._s3(), bucket).get_bytes(key)
            return None if data is None else json.loads(data)
        path = Path(self.registry)
        return json.loads(path.read_text()) if path.is_file() else None

    def load(self):
        """The chosen backbone (:func:`vcn.identity.backbone.load_backbone`), an S3 checkpoint read with this
        resource's S3 settings."""
        from vcn.identity.backbone import load_backbone

        name, checkpoint = self.choice()
        s3 = self._s3() if is_s3_uri(checkpoint) else None
        return load_backbone(name, checkpoint=checkpoint, device=self.device, s3=s3)

    def _s3(self):
        return s3_client(self.s3_endpoint_url, self.s3_region)
