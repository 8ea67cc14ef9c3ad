"""Reader for dlib's binary serialization of a DNN, as in its ``.dat`` model files.

dlib writes a network by recursion over its C++ type: each layer writes a
version number, then the whole sub-network beneath it, then its own state. The
file therefore opens with every layer's version number from the top down, then
the input layer, then each computing layer's state from the input upwards. Tag
and skip layers (``tag1``, ``skip1``...) write only their version: which tag a
skip jumps back to lives in the C++ type, not in the file. A reader thus sees
the order of computing layers and *where* the tag/skip markers sit, and a model
definition (:mod:`vcn.identity.models.dlib_resnet`) has to say what they mean.

The primitives, as dlib writes them:

- integers: one header byte, its low nibble the count of magnitude bytes that
  follow (little-endian), bit 7 the sign; 0 is ``01 00``;
- ``float``/``double`` scalars: two such integers, a mantissa ``m`` and an
  exponent ``e``, value ``m * 2**e`` (exponents 32000/32001/32002 mean +inf,
  -inf and NaN); a ``double`` keeps 53 mantissa bits, a ``float`` 24;
- strings: an integer length, then the bytes;
- ``bool``: one ASCII character, ``'1'`` or ``'0'``;
- tensors: version (2), four dimensions (samples, k, rows, cols), then the
  values as raw little-endian IEEE float32;
- alias tensors (a layer's view into its flat parameter tensor): version (1)
  and four dimensions, no data.

Only the records this reader knows are accepted (those of dlib's ResNet face
descriptor and its relatives); anything else raises :class:`DlibFormatError`
naming the byte offset, so that a wrong or damaged file fails at load time and
never yields a half-read network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np

from vcn.errors import VcnError

#: Version numbers dlib writes in the layer header: computing layers
#: (``add_layer``) write 2, tag and skip layers write 1, and the computing layer
#: that sits directly on the input layer writes 3.
_LAYER_VERSION = 2
_MARKER_VERSION = 1
_BOTTOM_LAYER_VERSION = 3
#: dlib's float_details exponents for the special values.
_EXPONENT_INF, _EXPONENT_NINF, _EXPONENT_NAN = 32000, 32001, 32002
#: No real network comes near this many layers; a header longer than this is garbage.
_MAX_LAYERS = 100_000


class DlibFormatError(VcnError, ValueError):
    """A file is not a dlib DNN serialization this reader understands."""

    def __init__(self, path: object, offset: int, reason: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: not a dlib network this reader understands (byte {offset}): {reason}")


@dataclass(frozen=True)
class LossMetric:
    """dlib's ``loss_metric``: a pair-wise margin loss on the output descriptors.

    Attributes:
        margin: Margin around ``distance_threshold`` in training.
        distance_threshold: Descriptor distance below which two faces are
            called the same person (0.6 for the face descriptor).
    """

    margin: float
    distance_threshold: float


@dataclass(frozen=True, eq=False)
class InputRGBImage:
    """dlib's ``input_rgb_image_sized``: fixed-size RGB input, mean-subtracted.

    dlib feeds ``(pixel - mean) / 256`` per channel to the first layer.

    Attributes:
        mean_rgb: (3,) float32 per-channel mean, red first, on the 0..255 scale.
        rows: Input height the network was built for.
        cols: Input width.
    """

    mean_rgb: np.ndarray
    rows: int
    cols: int


@dataclass(frozen=True, eq=False)
class Conv:
    """dlib's ``con``: 2-D cross-correlation with bias.

    Attributes:
        weight: (out, in, kernel rows, kernel cols) float32, the layout torch uses.
        bias: (out,) float32.
        stride: (y, x).
        padding: (y, x) zeros added on each side.
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, eq=False)
class Affine:
    """dlib's ``affine``: per-channel ``gamma * x + beta`` (a frozen batch norm).

    Attributes:
        gamma: (channels,) float32.
        beta: (channels,) float32.
    """

    gamma: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class Relu:
    """dlib's ``relu``."""


@dataclass(frozen=True)
class MaxPool:
    """dlib's ``max_pool``; padding positions never win the max."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class AvgPool:
    """dlib's ``avg_pool``; a kernel of (0, 0) averages the whole plane
    (``avg_pool_everything``). Padding positions are left out of the average."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class AddPrev:
    """dlib's ``add_prev``: the sum of the layer below and a tagged layer.

    When the two differ in shape the output takes the larger size in every
    dimension and each input contributes zeros where it has no value.
    """


@dataclass(frozen=True, eq=False)
class FullyConnected:
    """dlib's ``fc``.

    Attributes:
        weight: (outputs, inputs) float32, the layout of ``torch.nn.Linear``
            (dlib stores the transpose).
        bias: (outputs,) float32, or None for ``fc_no_bias``.
    """

    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True)
class Marker:
    """A tag or skip layer: it computes nothing; which one it is lives in the C++ type."""


Layer = Union[Conv, Affine, Relu, MaxPool, AvgPool, AddPrev, FullyConnected, Marker]


@dataclass(frozen=True, eq=False)
class DlibNet:
    """A dlib DNN as read from its file.

    Attributes:
        loss: The loss layer on top.
        input: The input layer at the bottom.
        layers: Every layer between them, input side first, tag and skip
            layers included as :class:`Marker`.
    """

    loss: LossMetric
    input: InputRGBImage
    layers: tuple[Layer, ...]


def read_dlib_net(path: str | Path) -> DlibNet:
    """Read a dlib DNN saved with ``dlib::serialize``, e.g. ``dlib_face_recognition_resnet_model_v1.dat``.

    Args:
        path: The ``.dat`` file.

    Returns:
        The network's layers and parameters; see :class:`DlibNet`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        DlibFormatError: If the file is not a complete dlib network made of the
            layer kinds this module knows (the message names the byte offset).
    """
    path = Path(path)
    return _parse_net(_Stream(path.read_bytes(), path))


class _Stream:
    """A cursor over the file's bytes with dlib's primitive decoders."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0

    def fail(self, reason: str, offset: int | None = None) -> DlibFormatError:
        return DlibFormatError(self.path, self.pos if offset is None else offset, reason)

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise self.fail(f"the file ends {len(self.data) - self.pos} bytes into a {count}-byte field")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def integer(self, what: str = "integer") -> int:
        start = self.pos
        header = self.take(1)[0]
        size = header & 0x0F
        if header & 0x70 or size == 0 or size > 8:
            raise self.fail(f"{what}: byte 0x{header:02x} is no dlib integer header", start)
        value = int.from_bytes(self.take(size), "little")
        return -value if header & 0x80 else value

    def count(self, what: str, maximum: int = 1 << 31) -> int:
        """A non-negative integer (a size, dimension or version), bounded against garbage."""
        start = self.pos
        value = self.integer(what)
        if not 0 <= value <= maximum:
            raise self.fail(f"{what} is {value}, expected 0..{maximum}", start)
        return value

    def real(self, what: str = "float") -> float:
        mantissa = self.integer(f"{what} mantissa")
        start = self.pos
        exponent = self.integer(f"{what} exponent")
        if exponent == _EXPONENT_INF:
            return math.inf
        if exponent == _EXPONENT_NINF:
            return -math.inf
        if exponent == _EXPONENT_NAN:
            return math.nan
        if abs(exponent) > 2000:
            raise self.fail(f"{what} exponent {exponent} is out of range", start)
        return math.ldexp(mantissa, exponent)

    def string(self, what: str = "string", maximum: int = 256) -> str:
        start = self.pos
        raw = self.take(self.count(f"{what} length", maximum))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not ASCII: {raw[:40]!r}", start) from None

    def boolean(self, what: str) -> bool:
        start = self.pos
        char = self.take(1)
        if char not in (b"0", b"1"):
            raise self.fail(f"{what}: expected a bool ('0' or '1'), got {char!r}", start)
        return char == b"1"

    def tensor(self, what: str) -> np.ndarray:
        """A dlib tensor, as a (samples, k, rows, cols) float32 array."""
        start = self.pos
        version = self.count(f"{what} version")
        if version != 2:
            raise self.fail(f"{what}: tensor serialization version {version} (only 2 is supported)", start)
        shape = tuple(self.count(f"{what} dimension") for _ in range(4))
        size = math.prod(shape)
        if 4 * size > len(self.data) - self.pos:
            raise self.fail(f"{what}: the file ends before this {shape} tensor does", start)
        values = np.frombuffer(self.take(4 * size), dtype="<f4")
        return values.astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        """An alias tensor's shape (a view into a layer's flat parameters)."""
        start = self.pos
        version = self.count(f"{what} version")
        if version != 1:
            raise self.fail(f"{what}: alias tensor version {version} (only 1 is supported)", start)
        return tuple(self.count(f"{what} dimension") for _ in range(4))  # type: ignore[return-value]


def _parse_net(stream: _Stream) -> DlibNet:
    # The loss layer writes its version and state, then the network beneath it.
    version = stream.count("loss layer version")
    if version != 1:
        raise stream.fail(f"the file does not start with a dlib loss layer (version {version}, expected 1)", 0)
    loss = _parse_loss(stream)

    # Layer header: versions from the top down to the layer on the input.
    versions: list[int] = []
    while True:
        start = stream.pos
        version = stream.count("layer version")
        if version == _BOTTOM_LAYER_VERSION:
            break
        if version not in (_LAYER_VERSION, _MARKER_VERSION):
            raise stream.fail(f"layer version {version} (expected 1, 2 or 3)", start)
        versions.append(version)
        if len(versions) > _MAX_LAYERS:
            raise stream.fail(f"more than {_MAX_LAYERS} layers")
    versions.reverse()

    # Then the input layer and the state of each computing layer, input side first.
    net_input = _parse_input(stream)
    layers: list[Layer] = [_parse_layer(stream)]
    _skip_layer_state(stream, bottom=True)
    for version in versions:
        if version == _MARKER_VERSION:
            layers.append(Marker())
        else:
            layers.append(_parse_layer(stream))
            _skip_layer_state(stream, bottom=False)
    if stream.pos != len(stream.data):
        raise stream.fail(f"{len(stream.data) - stream.pos} unread bytes after the last layer")
    return DlibNet(loss=loss, input=net_input, layers=tuple(layers))


def _parse_loss(stream: _Stream) -> LossMetric:
    start = stream.pos
    name = stream.string("loss layer name")
    if name != "loss_metric_2":
        raise stream.fail(f"loss layer {name!r} (only 'loss_metric_2' is supported)", start)
    return LossMetric(margin=stream.real("margin"), distance_threshold=stream.real("distance threshold"))


def _parse_input(stream: _Stream) -> InputRGBImage:
    start = stream.pos
    name = stream.string("input layer name")
    if name != "input_rgb_image_sized":
        raise stream.fail(f"input layer {name!r} (only 'input_rgb_image_sized' is supported)", start)
    mean = np.array([stream.real(f"avg_{c}") for c in ("red", "green", "blue")], dtype=np.float32)
    return InputRGBImage(mean_rgb=mean, rows=stream.count("input rows"), cols=stream.count("input cols"))


def _skip_layer_state(stream: _Stream, bottom: bool) -> None:
    """Read past what ``add_layer`` writes after its layer: training flags and cached tensors."""
    for flag in ("setup called", "gradient input stale", "output and gradient disabled"):
        stream.boolean(flag)
    for what in ("x_grad", "cached output", "params_grad"):
        stream.tensor(what)
    if bottom:
        # The bottom add_layer (version 3) also records the input's sample expansion factor.
        start = stream.pos
        factor = stream.count("sample expansion factor")
        if factor != 1:
            raise stream.fail(f"sample expansion factor {factor} (only 1 is supported)", start)


def _parse_layer(stream: _Stream) -> Layer:
    start = stream.pos
    name = stream.string("layer name")
    parser = _LAYER_PARSERS.get(name)
    if parser is None:
        raise stream.fail(f"unsupported layer {name!r} (known: {', '.join(sorted(_LAYER_PARSERS))})", start)
    return parser(stream)


def _pair(stream: _Stream, what: str) -> tuple[int, int]:
    return stream.count(f"{what} y"), stream.count(f"{what} x")


def _split_params(stream: _Stream, params: np.ndarray, shapes: list[tuple[int, ...]], what: str) -> list[np.ndarray]:
    """Cut a layer's flat parameter tensor into the views its alias tensors describe."""
    flat = params.reshape(-1)
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != flat.size:
        raise stream.fail(f"{what}: parameter views {shapes} need {sum(sizes)} values, the layer holds {flat.size}")
    parts, offset = [], 0
    for shape, size in zip(shapes, sizes):
        parts.append(flat[offset : offset + size].reshape(shape).copy())
        offset += size
    return parts


def _parse_conv(stream: _Stream) -> Conv:
    params = stream.tensor("con params")
    filters = stream.count("con filters")
    kernel = _pair(stream, "con kernel")
    stride = _pair(stream, "con stride")
    padding = _pair(stream, "con padding")
    weight_shape = stream.alias("con filters view")
    bias_shape = stream.alias("con biases view")
    for what in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
        stream.real(f"con {what} multiplier")
    if weight_shape[0] != filters or weight_shape[2:] != kernel or 0 in stride:
        raise stream.fail(f"con: filter view {weight_shape} disagrees with {filters} {kernel} filters, stride {stride}")
    if math.prod(bias_shape) != filters:
        raise stream.fail(f"con: bias view {bias_shape} does not hold {filters} values")
    weight, bias = _split_params(stream, params, [weight_shape, (filters,)], "con")
    return Conv(weight=weight, bias=bias, stride=stride, padding=padding)


def _parse_affine(stream: _Stream) -> Affine:
    params = stream.tensor("affine params")
    gamma_shape = stream.alias("affine gamma view")
    beta_shape = stream.alias("affine beta view")
    start = stream.pos
    mode = stream.count("affine mode")
    # dlib's layer_mode: 0 = per channel (CONV_MODE), 1 = per value (FC_MODE).
    if mode != 0:
        raise stream.fail(f"affine mode {mode} (only 0, per channel, is supported)", start)
    if gamma_shape != beta_shape or gamma_shape[0] != 1 or gamma_shape[2:] != (1, 1):
        raise stream.fail(f"affine: gamma view {gamma_shape} and beta view {beta_shape} are not per-channel")
    channels = gamma_shape[1]
    gamma, beta = _split_params(stream, params, [(channels,), (channels,)], "affine")
    return Affine(gamma=gamma, beta=beta)


def _parse_relu(stream: _Stream) -> Relu:
    return Relu()


def _parse_pool(stream: _Stream, kind: type[MaxPool] | type[AvgPool]) -> MaxPool | AvgPool:
    kernel = _pair(stream, "pool kernel")
    stride = _pair(stream, "pool stride")
    padding = _pair(stream, "pool padding")
    if 0 in stride:
        raise stream.fail(f"pool stride {stride} has a zero")
    return kind(kernel=kernel, stride=stride, padding=padding)


def _parse_add_prev(stream: _Stream) -> AddPrev:
    return AddPrev()


def _parse_fc(stream: _Stream) -> FullyConnected:
    outputs = stream.count("fc outputs")
    inputs = stream.count("fc inputs")
    params = stream.tensor("fc params")
    weight_shape = stream.alias("fc weights view")
    bias_shape = stream.alias("fc biases view")
    start = stream.pos
    bias_mode = stream.count("fc bias mode")
    for what in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
        stream.real(f"fc {what} multiplier")
    # dlib's fc_bias_mode: 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS.
    if bias_mode not in (0, 1):
        raise stream.fail(f"fc bias mode {bias_mode} (expected 0 or 1)", start)
    if weight_shape != (inputs, outputs, 1, 1):
        raise stream.fail(f"fc: weights view {weight_shape} is not ({inputs}, {outputs}, 1, 1)")
    if bias_mode == 1:
        (weight,) = _split_params(stream, params, [(inputs, outputs)], "fc")
        bias = None
    else:
        if math.prod(bias_shape) != outputs:
            raise stream.fail(f"fc: bias view {bias_shape} does not hold {outputs} values")
        weight, bias = _split_params(stream, params, [(inputs, outputs), (outputs,)], "fc")
    return FullyConnected(weight=np.ascontiguousarray(weight.T), bias=bias)


_LAYER_PARSERS: dict[str, Callable[[_Stream], Layer]] = {
    "con_4": _parse_conv,
    "affine_": _parse_affine,
    "relu_": _parse_relu,
    "max_pool_2": lambda stream: _parse_pool(stream, MaxPool),
    "avg_pool_2": lambda stream: _parse_pool(stream, AvgPool),
    "add_prev_": _parse_add_prev,
    "fc_2": _parse_fc,
}
