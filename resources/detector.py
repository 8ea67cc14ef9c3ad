"""The face detector as a Dagster resource."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from vcn.faces.detection import FaceDetector, create_detector


class DetectorResource(dg.ConfigurableResource):
    """Which face detector runs, at which resolution.

    RetinaFace-MobileNet at a 640 px longer side finds faces down to about 16 px
    at that scale (30 px in a 1280 px frame), which is below the crop filter's
    minimum face size, at a cost a 2-core machine sustains in real time.
    """

    name: str = Field(default="retinaface", description="Detector backend: 'retinaface' or 'mmdet'.")
    max_side: int = Field(default=640, description="Frames are downscaled to this longer side for detection.")
    score_threshold: float = Field(default=0.8, description="Minimum face confidence.")
    batch_size: int = Field(default=8, description="Frames per detector call.")
    threads: int = Field(default=0, description="Inference threads; 0 uses every core.")
    engine: str = Field(
        default="auto",
        description="RetinaFace's runtime: 'onnxruntime', 'torch' (on the GPU without onnxruntime-gpu), or 'auto' "
        "(the GPU when either can reach it, else ONNX Runtime on the CPU).",
    )

    def create(self) -> FaceDetector:
        options = {"score_threshold": self.score_threshold}
        if self.name == "retinaface":
            options.update(max_side=None, threads=self.threads or None, engine=self.engine)
        return create_detector(self.name, **options)
