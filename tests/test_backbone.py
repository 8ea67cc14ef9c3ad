"""Tests of the backbone registry (vcn.identity.backbone) and the models behind it.

Each backbone is checked against a reference computed here, independently of
``Backbone.embed``: the torch module on the same chips with the published
normalisation written out, then divided by its norm. Checkpoints are written
in every accepted format and read back, locally and from an S3 server (moto,
on localhost), and broken ones must fail with errors that say what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vcn
from vcn.identity.backbone import KNOWN_BACKBONES, Backbone, load_backbone
from vcn.identity.checkpoints import CheckpointError, CheckpointNotFoundError
from vcn.identity.models.dlib_resnet import DlibResNet, load_dlib_resnet
from vcn.identity.models.iresnet import LAYERS, create_iresnet


def random_chips(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def as_tensor(chips: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 chips as an (N, 3, H, W) float tensor on the 0..255 scale."""
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float()


def unit(x: torch.Tensor) -> np.ndarray:
    x = x.double()
    return (x / x.norm(dim=1, keepdim=True)).numpy()


def arcface_reference(model: torch.nn.Module, chips: np.ndarray) -> np.ndarray:
    """InsightFace's normalisation, (x / 255 - 0.5) / 0.5, then the model, then unit length."""
    with torch.no_grad():
        return unit(model.eval()((as_tensor(chips) / 255 - 0.5) / 0.5))


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def randomise_batch_norm_statistics(model: torch.nn.Module, seed: int) -> None:
    """Non-default running statistics, so that a checkpoint that fails to load them shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)


@pytest.fixture(autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test downloads and converts into a temporary cache, never ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "model-cache"
    monkeypatch.setenv("VCN_MODEL_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def dlib_state_dict_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DlibResNet]:
    """A randomly initialised DlibResNet (a stand-in for a finetuned one) saved as safetensors."""
    torch.manual_seed(0)
    model = DlibResNet().eval()
    path = tmp_path_factory.mktemp("dlib") / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@pytest.fixture(scope="module")
def dlib_backbone(dlib_state_dict_file: tuple[Path, DlibResNet]) -> Backbone:
    return load_backbone("dlib-resnet", dlib_state_dict_file[0], device="cpu")


# --- IResNet --------------------------------------------------------------------------------

#: Parameter counts of InsightFace's released arcface_torch checkpoints (millions).
PUBLISHED_PARAMETERS_M = {"iresnet18": 24.03, "iresnet34": 34.14, "iresnet50": 43.59, "iresnet100": 65.16}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_iresnet_depth_embeds_random_chips(name: str) -> None:
    torch.manual_seed(0)
    model = create_iresnet(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PUBLISHED_PARAMETERS_M[name], abs=0.01)
    backbone = Backbone(
        name=name,
        version="random",
        input_size=112,
        template="arcface-112",
        dim=512,
        device="cpu",
        dtype="float32",
        module=model,
        normalisation=(127.5, 127.5),
    )
    chips = random_chips(1 if name == "iresnet100" else 2, 112)

    embeddings = backbone.embed(chips)

    assert embeddings.shape == (len(chips), 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, arcface_reference(model, chips), atol=1e-5)


def test_iresnet_parameter_names_are_insightfaces() -> None:
    """Names and shapes as in InsightFace's arcface_torch state dicts (iresnet.py there)."""
    shapes = {}
    for name, layers in LAYERS.items():
        state = create_iresnet(name).state_dict()
        if name == "iresnet50":
            shapes = {key: tuple(value.shape) for key, value in state.items()}
        for stage, blocks in enumerate(layers, start=1):
            assert f"layer{stage}.{blocks - 1}.bn3.running_var" in state
            assert f"layer{stage}.{blocks}.bn1.weight" not in state
            assert f"layer{stage}.0.downsample.0.weight" in state
            assert f"layer{stage}.1.downsample.0.weight" not in state

    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.bn1.weight"] == (64,)
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["layer1.0.prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert shapes["layer2.0.bn1.weight"] == (64,)
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer2.0.downsample.1.running_mean"] == (128,)
    assert shapes["layer3.13.bn3.weight"] == (256,)
    assert shapes["bn2.weight"] == (512,)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7)
    assert shapes["fc.bias"] == (512,)
    assert shapes["features.running_var"] == (512,)
    top_level = {key.split(".")[0] for key in shapes}
    assert top_level == {"conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4", "bn2", "fc", "features"}


def test_iresnet50_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_iresnet("iresnet50")
    randomise_batch_norm_statistics(model, seed=1)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)

    backbone = load_backbone("iresnet50", checkpoint=path, device="cpu")

    assert (backbone.name, backbone.version) == ("iresnet50", f"iresnet50-{sha12(path)}")
    assert (backbone.input_size, backbone.template, backbone.dim) == (112, "arcface-112", 512)
    assert (backbone.device, backbone.dtype) == ("cpu", "float32")
    loaded = backbone.module.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())
    chips = random_chips(3, 112, seed=1)
    embeddings = backbone.embed(chips, batch_size=2)
    np.testing.assert_allclose(embeddings, arcface_reference(model, chips), atol=1e-5)
    # Mid-finetuning the module is in train mode; embed still uses running statistics, and leaves it so.
    backbone.module.train()
    np.testing.assert_allclose(backbone.embed(chips), embeddings, atol=1e-6)
    assert backbone.module.training


def test_iresnet_safetensors_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = create_iresnet("iresnet18")
    randomise_batch_norm_statistics(model, seed=2)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    backbone = load_backbone("iresnet18", str(path), device="cpu")

    assert backbone.version == f"iresnet18-{sha12(path)}"
    chips = random_chips(2, 112, seed=2)
    np.testing.assert_allclose(backbone.embed(chips), arcface_reference(model, chips), atol=1e-5)


def test_checkpoint_of_another_depth_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(create_iresnet("iresnet18").state_dict(), path)

    with pytest.raises(CheckpointError, match=r"does not fit iresnet50: missing keys \[layer1\.2\.") as caught:
        load_backbone("iresnet50", path, device="cpu")

    assert str(path) in str(caught.value) and "more]" in str(caught.value)
    assert caught.value.checkpoint == str(path)


def test_checkpoint_with_unexpected_keys_and_wrong_shapes(tmp_path: Path, dlib_state_dict_file) -> None:
    _, model = dlib_state_dict_file
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["fc.weight"] = torch.zeros(64, 256)
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pt"
    torch.save(state, path)

    with pytest.raises(CheckpointError) as caught:
        load_backbone("dlib-resnet", path, device="cpu")

    message = str(caught.value)
    assert "unexpected keys [head.weight]" in message
    assert "wrong shapes [fc.weight (64, 256) (expected (128, 256))]" in message
    assert "missing" not in message


def test_dlib_weights_given_as_an_iresnet(dlib_state_dict_file) -> None:
    with pytest.raises(CheckpointError, match=r"missing keys \[conv1\.weight.*unexpected keys \[blocks\.0\."):
        load_backbone("iresnet18", dlib_state_dict_file[0], device="cpu")


@pytest.mark.parametrize(
    ("file_name", "content", "reason"),
    [
        ("notes.pth", b"not a checkpoint at all\n", "cannot be read as a PyTorch state dict"),
        ("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "cannot be read as a safetensors file"),
        ("weights.h5", b"\x89HDF\r\n", "unsupported file type '.h5'"),
    ],
)
def test_unreadable_checkpoint(tmp_path: Path, file_name: str, content: bytes, reason: str) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as caught:
        load_backbone("iresnet18", path, device="cpu")
    assert str(path) in str(caught.value)


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    training_checkpoint = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 3, "state_dict_backbone": {"fc.weight": torch.zeros(2)}}, training_checkpoint)
    with pytest.raises(CheckpointError, match=r"non-tensor entries \[epoch, state_dict_backbone\]"):
        load_backbone("iresnet18", training_checkpoint, device="cpu")

    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_backbone("iresnet18", a_list, device="cpu")


def test_checkpoint_with_non_finite_weights(tmp_path: Path, dlib_state_dict_file) -> None:
    state = {key: value.clone() for key, value in dlib_state_dict_file[1].state_dict().items()}
    state["blocks.3.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"non-finite values in \[blocks\.3\.conv1\.weight\]"):
        load_backbone("dlib-resnet", path, device="cpu")


def test_weights_that_overflow_fail_loudly(tmp_path: Path, dlib_state_dict_file) -> None:
    state = {key: value.clone() for key, value in dlib_state_dict_file[1].state_dict().items()}
    state["fc.weight"].fill_(3e38)  # finite, but the descriptor overflows
    path = tmp_path / "overflowing.pt"
    torch.save(state, path)
    backbone = load_backbone("dlib-resnet", path, device="cpu")
    with pytest.raises(CheckpointError, match="gave 2 non-finite embeddings of 2"):
        backbone.embed(random_chips(2, 150))


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        load_backbone("iresnet50", tmp_path / "absent.pth", device="cpu")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_backbone("onnx", tmp_path, device="cpu")


@pytest.mark.parametrize("name", ["iresnet18", "onnx"])
def test_checkpoint_required(name: str) -> None:
    with pytest.raises(CheckpointError, match=f"backbone '{name}' needs a checkpoint"):
        load_backbone(name, device="cpu")


# --- dlib ResNet ----------------------------------------------------------------------------


def test_default_backbone_is_sface(model_cache: Path) -> None:
    backbone = vcn.load_backbone(device="cpu")
    assert backbone.name == "sface" and backbone.version.startswith("sface-2021dec-")
    assert (backbone.input_size, backbone.template, backbone.dim, backbone.dtype) == (112, "arcface-112", 128, "float32")


def test_dlib_backbone_is_dlibs_descriptor(tmp_path: Path, model_cache: Path) -> None:
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models (dlib's model files) is not installed")
    reference = load_dlib_resnet(cache_dir=tmp_path)

    backbone = vcn.load_backbone("dlib-resnet", device="cpu")

    assert (backbone.name, backbone.version) == ("dlib-resnet", reference.version)
    assert (backbone.input_size, backbone.template, backbone.dim, backbone.dtype) == (150, "dlib-150", 128, "float32")
    assert list(model_cache.glob(f"{reference.version}.safetensors")), "converted weights go to $VCN_MODEL_CACHE"
    chips = random_chips(3, 150, seed=3)
    with torch.no_grad():
        expected = unit(reference(as_tensor(chips)))
    np.testing.assert_allclose(backbone.embed(chips, batch_size=2), expected, atol=1e-5)


def test_dlib_state_dict_checkpoint(dlib_state_dict_file, dlib_backbone: Backbone) -> None:
    path, model = dlib_state_dict_file
    assert dlib_backbone.version == f"dlib-resnet-v1-{sha12(path)}"
    assert dlib_backbone.template == "dlib-150"
    chips = random_chips(2, 150, seed=4)
    with torch.no_grad():
        expected = unit(model(as_tensor(chips)))
    np.testing.assert_allclose(dlib_backbone.embed(chips), expected, atol=1e-5)


def test_dlib_file_that_is_not_a_dlib_network(tmp_path: Path) -> None:
    path = tmp_path / "model.dat"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: not dlib's ResNet face descriptor"):
        load_backbone("dlib-resnet", path, device="cpu")


# --- ONNX -----------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> Path:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (test extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["chips"],
            output_names=["embedding"],
            dynamic_axes={"chips": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None,
        )
    return path


class TinyNHWCEmbedder(torch.nn.Module):
    """A channels-last face "recogniser" with a fixed input size: (N, S, S, 3) -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(8 * 4 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x.permute(0, 3, 1, 2)))), 1))


def test_onnx_iresnet_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = create_iresnet("iresnet18")
    randomise_batch_norm_statistics(model, seed=5)
    path = export_onnx(model, torch.zeros(1, 3, 112, 112), tmp_path / "r18.onnx", dynamic_batch=True)

    backbone = load_backbone("onnx", str(path), device="cpu")

    assert (backbone.name, backbone.version) == ("onnx", f"onnx-{sha12(path)}")
    assert (backbone.input_size, backbone.template, backbone.dim) == (112, "arcface-112", 512)
    assert (backbone.device, backbone.dtype, backbone.module) == ("cpu", "float32", None)
    chips = random_chips(5, 112, seed=5)
    embeddings = backbone.embed(chips, batch_size=2)
    cosine = (embeddings.astype(np.float64) * arcface_reference(model, chips)).sum(axis=1)
    assert cosine.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_onnx_channels_last_fixed_batch_and_own_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = TinyNHWCEmbedder()
    path = export_onnx(model, torch.zeros(2, 112, 112, 3), tmp_path / "nhwc.onnx", dynamic_batch=False)

    backbone = load_backbone("onnx", path, device="cpu", input_mean=0.0, input_std=1.0)

    assert backbone.dim == 16
    assert backbone.version.startswith(f"onnx-{sha12(path)}-norm"), "another normalisation is another version"
    chips = random_chips(3, 112, seed=6)  # 3 chips through a model fixed at batches of 2: padded
    with torch.no_grad():
        expected = unit(model(torch.from_numpy(chips).float()))
    np.testing.assert_allclose(backbone.embed(chips), expected, atol=1e-5)


def test_onnx_model_of_another_input_size(tmp_path: Path) -> None:
    path = export_onnx(TinyNHWCEmbedder(), torch.zeros(1, 96, 96, 3), tmp_path / "small.onnx", dynamic_batch=True)
    with pytest.raises(CheckpointError, match="takes 96x96 chips; 'onnx' feeds arcface-112"):
        load_backbone("onnx", path, device="cpu")


def test_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"definitely not protobuf")
    with pytest.raises(CheckpointError, match="not an ONNX face recogniser onnxruntime can run"):
        load_backbone("onnx", path, device="cpu")


# --- S3 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    pytest.importorskip("moto.server", reason="the S3 tests run against moto's server (test extra)")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A boto3 S3 client on the moto server, with the environment the loader will see."""
    import boto3

    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3")
    if "models" not in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="models")
    return client


def test_checkpoint_from_s3_is_downloaded_once_per_etag(
    s3, dlib_state_dict_file, model_cache: Path, tmp_path: Path
) -> None:
    path, model = dlib_state_dict_file
    s3.upload_file(str(path), "models", "dlib/finetuned.safetensors")
    uri = "s3://models/dlib/finetuned.safetensors"

    backbone = load_backbone("dlib-resnet", uri, device="cpu")

    assert backbone.version == f"dlib-resnet-v1-{sha12(path)}"
    (cached,) = (model_cache / "s3").glob("*/finetuned.safetensors")
    assert cached.read_bytes() == path.read_bytes()
    assert not list((model_cache / "s3").glob("*/*.partial-*"))
    chips = random_chips(1, 150, seed=7)
    with torch.no_grad():
        np.testing.assert_allclose(backbone.embed(chips), unit(model(as_tensor(chips))), atol=1e-5)

    # Unchanged object: the cached copy is reused.
    stamp = cached.stat().st_mtime_ns
    assert load_backbone("dlib-resnet", uri, device="cpu").version == backbone.version
    assert cached.stat().st_mtime_ns == stamp

    # New content under the same key: a new ETag, a new download, a new version.
    torch.manual_seed(8)
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in DlibResNet().state_dict().items()}, str(other))
    s3.upload_file(str(other), "models", "dlib/finetuned.safetensors")
    assert load_backbone("dlib-resnet", uri, device="cpu").version == f"dlib-resnet-v1-{sha12(other)}"
    assert len(list((model_cache / "s3").glob("*/finetuned.safetensors"))) == 2


def test_s3_missing_bucket_and_missing_object(s3) -> None:
    uri = "s3://no-such-bucket/r50.pth"
    with pytest.raises(CheckpointNotFoundError, match=f"{uri}: bucket 'no-such-bucket' does not exist"):
        load_backbone("iresnet50", uri, device="cpu")
    uri = "s3://models/absent/r50.pth"
    with pytest.raises(CheckpointNotFoundError, match=f"{uri}: no object 'absent/r50.pth' in bucket 'models'"):
        load_backbone("iresnet50", uri, device="cpu")
    with pytest.raises(CheckpointError, match="not an s3://bucket/key URI"):
        load_backbone("iresnet50", "s3://models/", device="cpu")


def test_s3_without_credentials(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CheckpointError, match="no AWS credentials found"):
        load_backbone("iresnet50", "s3://models/r50.pth", device="cpu")


# --- the interface --------------------------------------------------------------------------


def test_unknown_backbone_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'; known: dlib-resnet, sface, iresnet18") as caught:
        load_backbone("resnet50")
    assert all(name in str(caught.value) for name in KNOWN_BACKBONES)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="apply to 'onnx' only"):
        load_backbone("iresnet50", "r50.pth", device="cpu", input_mean=0.0)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        load_backbone("dlib-resnet", device="gpu0")


def test_embed_rejects_malformed_chips(dlib_backbone: Backbone) -> None:
    expected = r"takes chips of shape \(N, 150, 150, 3\) aligned to 'dlib-150', got \(2, 112, 112, 3\)"
    with pytest.raises(ValueError, match=expected):
        dlib_backbone.embed(random_chips(2, 112))
    with pytest.raises(ValueError, match="must be uint8 RGB"):
        dlib_backbone.embed(random_chips(2, 150).astype(np.float32))
    with pytest.raises(ValueError, match=r"got \(150, 150, 3\)"):
        dlib_backbone.embed(random_chips(1, 150)[0])
    with pytest.raises(ValueError, match="must be a numpy array"):
        dlib_backbone.embed(torch.zeros(1, 150, 150, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        dlib_backbone.embed(random_chips(1, 150), batch_size=0)


def test_embed_of_no_chips(dlib_backbone: Backbone) -> None:
    empty = dlib_backbone.embed(np.zeros((0, 150, 150, 3), dtype=np.uint8))
    assert empty.shape == (0, 128) and empty.dtype == np.float32


def test_import_vcn_does_not_import_torch() -> None:
    code = "import sys, vcn, vcn.identity.backbone; assert callable(vcn.load_backbone); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
