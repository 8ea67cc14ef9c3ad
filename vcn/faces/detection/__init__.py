"""Face detection: boxes, scores and five landmarks per face.

Build a detector by name with :func:`create_detector`; every backend follows
the :class:`FaceDetector` protocol and returns :class:`Detections`.
"""

from __future__ import annotations

from typing import Any, Callable

from vcn.faces.detection.base import LANDMARK_NAMES, Detections, FaceDetector
from vcn.faces.detection.mmdet import MMDetFaceDetector
from vcn.faces.detection.retinaface import RetinaFaceDetector

_DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "retinaface": RetinaFaceDetector,
    "mmdet": MMDetFaceDetector,
}


def create_detector(name: str = "retinaface", **options: Any) -> FaceDetector:
    """Builds a face detector by name.

    Args:
        name: ``"retinaface"`` (:class:`~vcn.faces.detection.retinaface.RetinaFaceDetector`,
            the default, bundled weights) or ``"mmdet"``
            (:class:`~vcn.faces.detection.mmdet.MMDetFaceDetector`, your own model).
        **options: Keyword arguments of that detector's constructor.

    Raises:
        ValueError: If ``name`` is not a known detector.
    """
    if name not in _DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; known: {', '.join(sorted(_DETECTORS))}")
    return _DETECTORS[name](**options)


__all__ = ["LANDMARK_NAMES", "Detections", "FaceDetector", "create_detector"]
