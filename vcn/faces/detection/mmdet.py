"""Adapter for a user's own MMDetection (3.x) face detector.

MMDetection is an optional dependency (it needs a compiled ``mmcv``); it is
imported only when an :class:`MMDetFaceDetector` is built. Install it with
``pip install videoclusternet[mmdet]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vcn.batching import map_batches
from vcn.faces.detection.base import Detections
from vcn.faces.detection.batch import as_image_batch

#: Typical landmark positions as fractions of a face box's width and height, in
#: LANDMARK_NAMES order. Measured as the mean over frontal RetinaFace detections
#: (nose midway between the eyes) on the test clip, rounded and made symmetric.
#: WIDER FACE-trained detectors draw boxes the same way (brow to chin).
BOX_LANDMARK_PROPORTIONS = np.array(
    [[0.29, 0.39], [0.71, 0.39], [0.50, 0.58], [0.33, 0.75], [0.67, 0.75]], dtype=np.float32
)


def landmarks_from_boxes(boxes: np.ndarray) -> np.ndarray:
    """Estimates the five landmarks of upright frontal faces from their boxes.

    A stand-in for detectors that predict no landmarks: alignment from these
    points only normalises scale and position, not head roll or yaw.

    Args:
        boxes: (N, 4) ``x1, y1, x2, y2``.

    Returns:
        (N, 5, 2) float32 ``x, y`` at :data:`BOX_LANDMARK_PROPORTIONS` of each box.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    origin = boxes[:, None, :2]
    size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    return (origin + BOX_LANDMARK_PROPORTIONS * size).astype(np.float32)


class MMDetFaceDetector:
    """Runs an MMDetection 3.x face model behind the :class:`FaceDetector` interface.

    Every class the model predicts is taken as a face, so use a single-class
    face model. If its predictions carry five keypoints per instance
    (``pred_instances.keypoints`` of shape (N, 5, 2), in :data:`LANDMARK_NAMES`
    order), those are the landmarks; otherwise they are estimated from the box
    with :func:`landmarks_from_boxes`, which is rough for turned or tilted heads.

    Args:
        config: Path of the model's MMDetection config file.
        checkpoint: Path of its weights (a local file: nothing is downloaded).
        device: Torch device the model runs on, e.g. ``"cpu"`` or ``"cuda:0"``.
        score_threshold: Keep faces whose confidence is at least this. 0.5 suits
            most MMDetection heads, whose scores run lower than RetinaFace's.

    Raises:
        ImportError: If MMDetection is not installed.
        FileNotFoundError: If the config or checkpoint does not exist.
        ValueError: If ``score_threshold`` is outside [0, 1].
    """

    def __init__(
        self,
        config: str,
        checkpoint: str,
        device: str = "cpu",
        score_threshold: float = 0.5,
    ) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as error:
            raise ImportError(
                "MMDetFaceDetector needs MMDetection 3.x and a compiled mmcv: "
                "pip install videoclusternet[mmdet]"
            ) from error
        for what, path in (("config", config), ("checkpoint", checkpoint)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"MMDetection {what} not found: {path}")
        self.name = f"mmdet-{Path(config).stem}"
        self.score_threshold = score_threshold
        self._inference_detector = inference_detector
        self.model = init_detector(str(config), str(checkpoint), device=device)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detects faces in a batch of images.

        Args:
            images: uint8 RGB images of shape (H, W, 3), all of one size.

        Returns:
            One :class:`Detections` per image, in that image's pixels, sorted by
            descending score, boxes clipped to the image.

        Raises:
            ValueError: If an image is not uint8 (H, W, 3) or sizes differ.
            torch.OutOfMemoryError: If not even one image fits the GPU's memory.
        """
        batch = as_image_batch(images)
        if len(batch) == 0:
            return []
        height, width = batch.shape[1:3]
        # MMDetection pipelines expect BGR, the order they read files in. One call for the
        # whole batch, in smaller parts if it runs out of GPU memory (images are independent).
        bgr = [np.ascontiguousarray(image[..., ::-1]) for image in batch]
        parts = map_batches(
            lambda part: self._inference_detector(self.model, part), bgr, len(bgr), f"{self.name} detection"
        )
        samples = [sample for part in parts for sample in part]
        results = []
        for sample in samples:
            instances = sample.pred_instances
            scores = instances.scores.detach().cpu().numpy().astype(np.float32)
            keep = np.flatnonzero(scores >= self.score_threshold)
            keep = keep[np.argsort(-scores[keep], kind="stable")]
            boxes = instances.bboxes.detach().cpu().numpy().astype(np.float32)[keep]
            keypoints = (
                instances.keypoints.detach().cpu().numpy() if "keypoints" in instances else None
            )
            if keypoints is not None and keypoints.shape[1:] == (5, 2):
                landmarks = keypoints[keep].astype(np.float32)
            else:
                landmarks = landmarks_from_boxes(boxes)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0.0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0.0, height)
            results.append(Detections(boxes=boxes, scores=scores[keep], landmarks=landmarks))
        return results
