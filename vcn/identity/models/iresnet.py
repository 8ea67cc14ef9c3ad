"""InsightFace's IResNet face-recognition backbones (iresnet18/34/50/100) as torch modules.

The "improved" ResNet of ArcFace (Deng et al., CVPR 2019; Duta et al., "Improved
Residual Networks", 2020) as InsightFace trains it in ``arcface_torch``: a
112x112 RGB chip aligned to :data:`vcn.faces.align.ARCFACE_112`, normalised to
``(x / 255 - 0.5) / 0.5``, in; a 512-d embedding out. The module and parameter
names here equal InsightFace's, so their published state dicts load with
``strict=True``; the paper's reference base model (ArcFace-R100) is ``iresnet100``.

Layout, input side first::

    conv1 3x3 64 - bn1 - prelu                        112 x 112
    layer1 .. layer4: 64, 128, 256, 512 channels,     56, 28, 14, 7
        the first block of each strided by 2
    bn2 - flatten - dropout - fc (512*7*7 -> 512) - features (BatchNorm1d)

A block (:class:`IBasicBlock`) is ``bn1 - conv1 3x3 - bn2 - prelu - conv2
3x3(stride) - bn3``, added to its input (through ``downsample`` = conv1x1(stride)
+ BN where the shape changes), with no activation after the sum.
"""

from __future__ import annotations

import torch
from torch import nn

from vcn.identity.models.split import SplitNetwork

#: Side of the square chip the networks take (:data:`vcn.faces.align.ARCFACE_112`).
INPUT_SIZE = 112
#: Length of the embedding.
EMBEDDING_DIM = 512
#: Blocks per stage of each depth, as in InsightFace.
LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
_STAGE_CHANNELS = (64, 128, 256, 512)
#: Side of the last feature map: 112 halved by each of the four stages.
_FINAL_SIDE = INPUT_SIZE // 16
#: InsightFace's batch-norm epsilon.
_BN_EPS = 1e-5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet.

    Args:
        in_channels: Channels of the input.
        channels: Channels of the output.
        stride: Stride of the second convolution (2 halves the resolution).
        downsample: Projection of the input onto the output's shape, where they differ.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(SplitNetwork):
    """IResNet: 112x112 RGB chip in, 512-d (unnormalised) embedding out.

    Build it with :func:`create_iresnet`. Random weights are for tests only:
    the convolutions start He-normal so that a random network's activations
    stay finite through 100 layers in eval mode (InsightFace's own N(0, 0.1)
    start assumes training-mode batch norm); every real use loads a checkpoint.
    Chips go in as (N, 3, 112, 112) RGB normalised to ``(x / 255 - 0.5) / 0.5``.
    The trunk ends where ``layer4`` begins; the head is ``dropout``, ``fc`` and
    ``features``.

    Args:
        layers: Blocks in each of the four stages.
        dropout: Dropout probability before ``fc``. 0 (InsightFace's default)
            makes it a no-op; a positive value with the module in train mode
            gives the stochastic passes of SER-FIQ-style quality estimates.
    """

    input_size = INPUT_SIZE
    #: ``layer4`` (512 channels), the batch norm after it, ``fc`` and the ``features`` batch norm.
    last_stage_prefixes = ("layer4", "bn2", "fc", "features")

    def __init__(self, layers: tuple[int, int, int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, _STAGE_CHANNELS[0])
        self.bn1 = nn.BatchNorm2d(_STAGE_CHANNELS[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(_STAGE_CHANNELS[0])
        in_channels = _STAGE_CHANNELS[0]
        stages = []
        for channels, blocks in zip(_STAGE_CHANNELS, layers):
            stages.append(self._make_stage(in_channels, channels, blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(in_channels, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * _FINAL_SIDE * _FINAL_SIDE, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM, eps=_BN_EPS)
        self._init_weights()
        # InsightFace fixes the scale of the output batch norm at 1 and never trains it.
        self.features.weight.requires_grad = False

    @staticmethod
    def _make_stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
        # Every stage halves the resolution and (but for layer1) changes the width,
        # so its first block always needs the projection.
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(channels, eps=_BN_EPS),
        )
        stage = [IBasicBlock(in_channels, channels, stride=2, downsample=downsample)]
        stage += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 256, 14, 14) feature maps entering ``layer4``."""
        self.check_chips(x)
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_last_stage(self, trunk: torch.Tensor) -> torch.Tensor:
        """Flattened features from :meth:`forward_trunk`'s output (``layer4``, ``bn2``)."""
        return torch.flatten(self.bn2(self.layer4(trunk)), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 512) embeddings from :meth:`forward_features`' output (``dropout``, ``fc``, ``features``)."""
        return self.features(self.fc(self.dropout(features)))


def create_iresnet(name: str, dropout: float = 0.0) -> IResNet:
    """An IResNet of the given depth with random weights, in train mode.

    Args:
        name: ``"iresnet18"``, ``"iresnet34"``, ``"iresnet50"`` or ``"iresnet100"``.
        dropout: See :class:`IResNet`.

    Raises:
        ValueError: If ``name`` is not one of those; the message lists them.
    """
    try:
        layers = LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown IResNet {name!r}; known: {', '.join(LAYERS)}") from None
    return IResNet(layers, dropout=dropout)
