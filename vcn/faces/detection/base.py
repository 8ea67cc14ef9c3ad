"""The face detector interface and the per-image detection container."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

#: Landmark order used throughout the platform (RetinaFace's): the subject's
#: right eye (left in the image), left eye, nose tip, right and left mouth corner.
LANDMARK_NAMES = ("right_eye", "left_eye", "nose", "mouth_right", "mouth_left")


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, in pixels of that image.

    Attributes:
        boxes: (N, 4) float32, ``x1, y1, x2, y2``.
        scores: (N,) float32 confidence in [0, 1].
        landmarks: (N, 5, 2) float32 ``x, y`` in :data:`LANDMARK_NAMES` order.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.landmarks.shape != (n, 5, 2):
            raise ValueError(
                f"inconsistent detection arrays: boxes {self.boxes.shape}, "
                f"scores {self.scores.shape}, landmarks {self.landmarks.shape}"
            )

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            landmarks=np.zeros((0, 5, 2), np.float32),
        )

    def scaled(self, factor: float) -> "Detections":
        """The same detections with every coordinate multiplied by ``factor``."""
        return Detections(
            boxes=(self.boxes * factor).astype(np.float32),
            scores=self.scores,
            landmarks=(self.landmarks * factor).astype(np.float32),
        )


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces with five landmarks in RGB images.

    Implementations take a batch of uint8 (H, W, 3) RGB images of one size and
    return one :class:`Detections` per image, in that image's pixels. They own
    any resizing they need internally.
    """

    #: Short name recorded in lineage and metadata (e.g. ``"retinaface-mnet"``).
    name: str

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        ...
