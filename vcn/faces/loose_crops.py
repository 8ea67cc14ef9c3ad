"""Finding and aligning the face inside the loose crops of a track dataset.

Track datasets (``shared/formats/trackset-v1.md``) ship each face as a loose,
roughly square crop: face centred, crop side about twice the face box, any
size. The face-ID backbone wants chips aligned to its template, so every crop
goes through the detector and the five landmarks of the face that best fits
that expectation are warped onto the template.

When the detector finds nothing plausible (heavy blur, occluders, profile
views), we still know where the face is meant to be, so the crop is aligned
from a stand-in rather than dropped:

- ``track_median``: the median landmarks, in crop-relative coordinates, of the
  crops of the same track where a face was found. A track drifts slowly, so
  this is usually within a few pixels.
- ``centre_prior``: when no crop of the track has a detection, the landmarks an
  average face would have in the central face box the format promises (side
  half the crop, centred).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import polars as pl

from vcn.faces.align import AlignmentTemplate, align_face, get_template
from vcn.faces.detection.base import FaceDetector
from vcn.formats.trackset import TrackProblem, TrackSet

logger = logging.getLogger(__name__)

#: Side of the square every crop is letterboxed to for the first detection pass.
#: Measured on dev-ep (6,785 crops of 128 px, faces ~60 px; 2 CPU threads,
#: detector time alone, score >= 0.5, the plausibility gate below):
#:
#: ====  =============  ==========
#: side  faces found    detector
#: ====  =============  ==========
#: 128   6,453 (95.1%)   7 s
#: 160   6,546 (96.5%)  10 s
#: 192   6,555 (96.6%)  14 s
#: 256   6,589 (97.1%)  24 s
#: 320   6,603 (97.3%)  37 s
#: ====  =============  ==========
#:
#: The face then spans ~80 px, inside RetinaFace's 64-128 px anchors. Larger
#: inputs find a few more faces at 2.4-3.7x the cost and do not steady the
#: landmarks (frame-to-frame landmark jitter within tracks is the same, 1.7 px,
#: at every size). Those few are better won by a second look at the misses
#: alone, :data:`RETRY_SIZE`.
DETECTION_SIZE = 160
#: Side of the second pass over the crops where the first found no face: 160 px
#: then 320 px finds 6,628 faces (97.7%), more than 320 px alone, in ~11 s of
#: detector time (~20 s for the whole alignment of dev-ep on 2 cores).
RETRY_SIZE = 320
#: Largest crop image accepted, in pixels (the video limit, 8192 x 8192): a crop is a face with
#: some margin, and a header claiming more is damaged or hostile, so it is refused before decoding.
MAX_CROP_PIXELS = 8192 * 8192

#: Where the face is expected in a crop, in crop-relative units: centred, box
#: side half the crop (the format: "crop side about twice the face box").
_EXPECTED_SIDE = 0.5
#: Spread of the expectation used to rank detections. On dev-ep the box centre
#: is within 0.06 of the crop centre and the side within 0.44-0.56 for 90% of
#: crops; the widths leave room for drift while favouring the central face over
#: a neighbour's at the crop edge.
_CENTRE_SIGMA = 0.15
_LOG_SIDE_SIGMA = 0.35
#: A detection this far from the expectation is not the crop's face (a
#: neighbour cut by the crop edge, or a false positive in a blurred crop).
_MAX_CENTRE_OFFSET = 0.3
_SIDE_RANGE = (0.25, 1.0)

#: An average face's RetinaFace landmarks relative to its box: (x, y) offset
#: from the box centre in box sides, LANDMARK_NAMES order: the median over the
#: ~6,600 faces RetinaFace finds in dev-ep's crops (at 160 and at 320 px alike),
#: made left-right symmetric.
#: Placing it in the central face box and aligning puts the template's five
#: reference points where that average face would be. (Scaling the template's
#: own points into the box instead would inherit each template's margin:
#: arcface-112 is tight, dlib-150 loose, and their chips would come out 25% and
#: 8% too large.)
_FACE_IN_BOX = np.array(
    [[-0.197, -0.120], [0.197, -0.120], [0.0, 0.120], [-0.160, 0.290], [0.160, 0.290]],
    dtype=np.float64,
)

#: Fill of the letterbox borders: the detector's mean colour (RGB), which its
#: normalisation turns into zeros, the most neutral input.
_PAD_RGB = (123, 117, 104)
#: Crops with a shorter side are enlarged before alignment (see :func:`_align`).
_MIN_ALIGN_SIDE = 32

METHODS = ("detected", "track_median", "centre_prior")

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class AlignedCrops:
    """The aligned face of every readable crop of a track dataset.

    Attributes:
        table: One row per readable crop, in ``crops.csv`` order: ``track_id``
            (str), ``frame`` (Int64), ``path`` (str), ``face_found`` (bool),
            ``score`` (Float32 detector confidence; NaN when not found),
            ``method`` (str, one of :data:`METHODS`: how the landmarks were had).
        chips: (N, S, S, 3) uint8 RGB chips aligned to the template, row-aligned
            with ``table``.
        landmarks: (N, 5, 2) float32 landmarks used for each chip, in the
            original crop's pixels.
        problems: Crops that could not be read (skipped) and tracks left with no
            readable crop.
        template: Name of the alignment template.
    """

    table: pl.DataFrame
    chips: np.ndarray
    landmarks: np.ndarray
    problems: list[TrackProblem]
    template: str

    def method_counts(self) -> dict[str, int]:
        """How many crops each method aligned, every method listed."""
        counts = dict.fromkeys(METHODS, 0)
        for method, count in self.table["method"].value_counts().iter_rows():
            counts[method] = count
        return counts


def align_loose_crops(
    trackset: TrackSet,
    template_name: str,
    detector: FaceDetector | None = None,
    batch_size: int = 64,
    progress: ProgressCallback | None = None,
    detection_size: int = DETECTION_SIZE,
    retry_size: int | None = RETRY_SIZE,
) -> AlignedCrops:
    """Finds the face in every crop of a track dataset and aligns it.

    Each crop is decoded (JPEG, PNG or anything OpenCV reads; grey and RGBA
    become RGB), letterboxed to a square of ``detection_size`` and run through
    the detector in batches. Of the faces found, the one that best combines
    detector confidence with the expected place (centred, side half the crop)
    is kept if it is plausible; its landmarks, mapped back to the crop's pixels,
    are warped onto the template. Crops without a face are looked at again at
    ``retry_size``, then aligned from the track's median landmarks or, failing
    those, from a centred average face (see the module docstring).

    Crops of tracks already listed in ``trackset.problems`` are not processed:
    those tracks are left Unknown whatever their crops show.

    Args:
        trackset: The dataset, from :func:`vcn.formats.trackset.read_trackset`.
        template_name: Alignment template, e.g. ``"dlib-150"`` or ``"arcface-112"``.
        detector: Face detector; by default RetinaFace at native resolution
            with a 0.5 score threshold, low because a face is known to be there.
        batch_size: Crops per detector call. 64 amortises the call overhead;
            lower it only to save memory.
        progress: Called as ``progress(done, total)`` after each batch.
        detection_size: Side of the first detection pass; see :data:`DETECTION_SIZE`.
        retry_size: Side of the second pass over the misses; ``None`` skips it.

    Returns:
        The chips with one table row per readable crop, and the problems found.

    Raises:
        ValueError: On an unknown template, a batch size below 1 or a detection
            size below 32 px.
    """
    template = get_template(template_name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if detection_size < 32 or (retry_size is not None and retry_size < 32):
        raise ValueError(f"detection sizes must be at least 32 px, got {detection_size} and {retry_size}")
    if detector is None:
        from vcn.faces.detection.retinaface import RetinaFaceDetector

        detector = RetinaFaceDetector(score_threshold=0.5, max_side=None)

    skipped = trackset.problem_track_ids
    crops = trackset.crops.filter(~pl.col("track_id").is_in(sorted(skipped))) if skipped else trackset.crops
    track_ids = crops["track_id"].to_list()
    paths = crops["path"].to_list()
    total = len(paths)
    started = time.perf_counter()

    # Per readable crop: its row in `crops`, score, and crop-relative landmarks if found.
    rows: list[int] = []
    scores: list[float] = []
    relative: list[np.ndarray | None] = []
    encoded_misses: dict[int, bytes] = {}
    chips = np.zeros((total, template.size, template.size, 3), dtype=np.uint8)
    landmarks = np.zeros((total, 5, 2), dtype=np.float32)
    problems: list[TrackProblem] = []

    # First pass: decode, detect in batches, align the crops with a face.
    for batch_start in range(0, total, batch_size):
        batch_rows, batch_bytes, batch_images = [], [], []
        for row in range(batch_start, min(batch_start + batch_size, total)):
            data, image, reason = _read_crop(trackset.root / paths[row])
            if image is None:
                problems.append(TrackProblem(track_ids[row], f"crop file {paths[row]} {reason}; skipped"))
                continue
            batch_rows.append(row)
            batch_bytes.append(data)
            batch_images.append(image)
        found = _find_faces(detector, batch_images, detection_size)
        for row, data, image, face in zip(batch_rows, batch_bytes, batch_images, found):
            index = len(rows)
            rows.append(row)
            if face is None:
                scores.append(float("nan"))
                relative.append(None)
                encoded_misses[index] = data
            else:
                points, score = face
                scores.append(score)
                relative.append(points / [image.shape[1], image.shape[0]])
                landmarks[index] = points
                chips[index] = _align(image, points, template)
        if progress is not None:
            progress(min(batch_start + batch_size, total), total)

    # Second pass: a larger look at the misses.
    if retry_size is not None and encoded_misses:
        misses = list(encoded_misses)
        for batch_start in range(0, len(misses), batch_size):
            batch = misses[batch_start : batch_start + batch_size]
            images = [_decode(encoded_misses[index]) for index in batch]
            for index, image, face in zip(batch, images, _find_faces(detector, images, retry_size)):
                if face is not None:
                    points, score = face
                    scores[index] = score
                    relative[index] = points / [image.shape[1], image.shape[0]]
                    landmarks[index] = points
                    chips[index] = _align(image, points, template)
                    del encoded_misses[index]

    # Stand-ins for the faces still not found: the track's median, else the prior.
    found_by_track: dict[str, list[np.ndarray]] = {}
    for index, points in enumerate(relative):
        if points is not None:
            found_by_track.setdefault(track_ids[rows[index]], []).append(points)
    track_median = {track: np.median(np.stack(points), axis=0) for track, points in found_by_track.items()}
    methods = ["detected"] * len(rows)
    for index, data in encoded_misses.items():
        track_id = track_ids[rows[index]]
        stand_in = track_median.get(track_id)
        methods[index] = "centre_prior" if stand_in is None else "track_median"
        image = _decode(data)
        height, width = image.shape[:2]
        if stand_in is None:
            # The face box is square: half the crop's geometric-mean side, centred.
            side = _EXPECTED_SIDE * np.sqrt(width * height)
            points = _FACE_IN_BOX * side + [width / 2, height / 2]
        else:
            points = stand_in * [width, height]
        landmarks[index] = points
        chips[index] = _align(image, points, template)

    # Tracks whose every crop was unreadable.
    readable_tracks = {track_ids[row] for row in rows}
    reported: set[str] = set()
    for track_id in track_ids:
        if track_id not in readable_tracks and track_id not in reported:
            reported.add(track_id)
            problems.append(TrackProblem(track_id, "no readable crop image"))

    kept = np.asarray(rows, dtype=np.int64)
    table = crops[kept].with_columns(
        face_found=pl.Series([method == "detected" for method in methods], dtype=pl.Boolean),
        score=pl.Series(scores, dtype=pl.Float32),
        method=pl.Series(methods, dtype=pl.String),
    )
    result = AlignedCrops(
        table=table.select("track_id", "frame", "path", "face_found", "score", "method"),
        chips=chips[: len(rows)],
        landmarks=landmarks[: len(rows)],
        problems=problems,
        template=template.name,
    )
    logger.info(
        "aligned %d crops to %s in %.1f s: %s; %d problem(s)",
        len(rows),
        template.name,
        time.perf_counter() - started,
        result.method_counts(),
        len(problems),
    )
    return result


def _read_crop(path: Path) -> tuple[bytes | None, np.ndarray | None, str]:
    """The crop's bytes and RGB image, or ``None`` and why it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, None, f"cannot be read ({error.strerror or error})"
    image = _decode(data)
    if image is None:
        return None, None, "is not a readable image"
    return data, image, ""


def _decode(data: bytes) -> np.ndarray | None:
    """Encoded image bytes as (H, W, 3) uint8 RGB, or ``None`` if they do not decode.

    ``IMREAD_COLOR`` turns grey and palette images to three channels, drops
    alpha, brings 16-bit images to 8 bits and applies EXIF orientation. An
    image whose header claims more than :data:`MAX_CROP_PIXELS` is refused
    before decoding: a few hundred hostile bytes could otherwise claim a
    30000 x 30000 picture and cost gigabytes.
    """
    if not data or _claimed_pixels(data) > MAX_CROP_PIXELS:
        return None
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own limits (for example 2**30 pixels) raise instead of returning None
        return None
    if image is None or image.size == 0:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _claimed_pixels(data: bytes) -> int:
    """Width x height that the image's header claims (read without decoding); 0 when Pillow cannot tell."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError:  # Pillow's own refusal: far above any limit of ours
        return MAX_CROP_PIXELS + 1
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 0
    return width * height


def _letterbox(image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image`` scaled to fit a ``side`` square and centred on the mean colour.

    Returns:
        The square image, and the per-axis scale and (x, y) offset that carry
        crop pixels into it: ``square_xy = crop_xy * scale + offset``.
    """
    height, width = image.shape[:2]
    factor = side / max(height, width)
    new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
    if (new_width, new_height) != (width, height):
        # Area averaging when shrinking avoids aliasing; bilinear when enlarging.
        interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    x0, y0 = (side - new_width) // 2, (side - new_height) // 2
    x1, y1 = side - new_width - x0, side - new_height - y0
    if x0 or y0 or x1 or y1:
        image = cv2.copyMakeBorder(image, y0, y1, x0, x1, cv2.BORDER_CONSTANT, value=_PAD_RGB)
    # cv2.resize maps pixel centres: x' + 0.5 = (x + 0.5) * new / old.
    scale = np.array([new_width / width, new_height / height])
    offset = np.array([x0, y0]) + 0.5 * scale - 0.5
    return image, scale, offset


def _find_faces(
    detector: FaceDetector, images: list[np.ndarray], side: int
) -> list[tuple[np.ndarray, float] | None]:
    """The crop's own face in each image: (5, 2) landmarks in its pixels and the score, or ``None``."""
    if not images:
        return []
    boxed = [_letterbox(image, side) for image in images]
    detections = detector.detect([square for square, _, _ in boxed])
    faces: list[tuple[np.ndarray, float] | None] = []
    for image, (_, scale, offset), found in zip(images, boxed, detections):
        # Back to the crop's pixels.
        boxes = (found.boxes.reshape(-1, 2, 2) - offset) / scale
        points = (found.landmarks - offset) / scale
        best = _best_face(boxes, found.scores, image.shape[1], image.shape[0])
        faces.append(None if best is None else (points[best], float(found.scores[best])))
    return faces


def _best_face(boxes: np.ndarray, scores: np.ndarray, width: int, height: int) -> int | None:
    """Index of the detection most likely the crop's own face, or ``None`` if none is plausible.

    Detector confidence is weighted by how well the box fits the expectation
    (centred, side half the crop); a box outside the plausible range is never
    taken, however confident.

    Args:
        boxes: (N, 2, 2) box corners ``[[x1, y1], [x2, y2]]`` in crop pixels.
        scores: (N,) detector confidences.
        width, height: The crop's size.
    """
    if not len(scores):
        return None
    size = np.array([width, height], dtype=np.float64)
    centres = boxes.mean(axis=1) / size - 0.5
    offset = np.hypot(centres[:, 0], centres[:, 1])
    extent = (boxes[:, 1] - boxes[:, 0]).clip(min=1e-6)
    side = np.sqrt(extent.prod(axis=1) / size.prod())
    log_size_error = np.log(side / _EXPECTED_SIDE)
    fit = np.exp(-0.5 * (offset / _CENTRE_SIGMA) ** 2 - 0.5 * (log_size_error / _LOG_SIDE_SIGMA) ** 2)
    plausible = (offset <= _MAX_CENTRE_OFFSET) & (side >= _SIDE_RANGE[0]) & (side <= _SIDE_RANGE[1])
    if not plausible.any():
        return None
    return int(np.argmax(np.where(plausible, scores * fit, -1.0)))


def _align(image: np.ndarray, points: np.ndarray, template: AlignmentTemplate) -> np.ndarray:
    """:func:`~vcn.faces.align.align_face`, first enlarging a crop too small for its landmarks.

    A crop of a few pixels decodes fine but its landmarks lie within a pixel of
    each other, which ``align_face`` rightly refuses as a detector failure;
    enlarged, the same geometry aligns (to a blurred chip, which is all there is).
    """
    height, width = image.shape[:2]
    factor = int(np.ceil(_MIN_ALIGN_SIDE / min(height, width)))
    if factor > 1:
        image = cv2.resize(image, (width * factor, height * factor), interpolation=cv2.INTER_LINEAR)
        points = (np.asarray(points, dtype=np.float64) + 0.5) * factor - 0.5
    return align_face(image, points, template)
