"""A frozen ONNX face recogniser, run with onnxruntime.

For face-ID models that ship only as ONNX (InsightFace's model packs, vendors'
exports): aligned uint8 RGB chips in, the model's embeddings out. The model is
only run, never trained; the method's finetuning needs a torch backbone.

What the runner reads from the model itself: the input layout (NCHW or NHWC,
from which axis has 3 channels), the chip size (a fixed spatial shape, else
112), a fixed batch size if the export has one (batches are then padded to it),
the input precision (float32 or float16) and the embedding length (from one
probe run at load, which also proves the model runs). What it cannot read is the
pixel normalisation, so that is an argument: ArcFace's ``(x - 127.5) / 127.5``
by default; InsightFace's converted MXNet models that normalise inside the graph
want ``mean=0, std=1``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Chip side used when the model's spatial input dimensions are symbolic.
DEFAULT_INPUT_SIZE = 112
#: ArcFace's pixel normalisation, ``(x - 127.5) / 127.5``, on the 0..255 scale.
ARCFACE_MEAN = 127.5
ARCFACE_STD = 127.5
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxFaceEmbedder:
    """An ONNX face recogniser behind one call: uint8 chips in, embeddings out.

    Args:
        path: The ``.onnx`` file.
        device: ``"cpu"`` or ``"cuda[:index]"``. CUDA runs on onnxruntime's
            CUDA provider (CPU as fallback for unsupported nodes); when the
            installed onnxruntime has none, the model runs on the CPU with a warning.
        mean: Subtracted from the 0..255 RGB pixels; one value or one per channel (R, G, B).
        std: Divides them afterwards; one value or one per channel.

    Attributes:
        input_size: Side of the square chip the model takes.
        dim: Length of the embedding.
        layout: ``"NCHW"`` or ``"NHWC"``, the model's input layout.
        device: Where it actually runs: ``"cpu"`` or ``"cuda:<index>"``.
        input_dtype: ``numpy.float32`` or ``numpy.float16``, what the model takes.
        mean: (3,) float32 per-channel mean used.
        std: (3,) float32 per-channel std used.

    Raises:
        ValueError: If the model's input or output is not that of a face
            recogniser (one image input of 3 channels, one embedding per image
            out), or ``mean``/``std`` are unusable.
        onnxruntime.capi.onnxruntime_pybind11_state.Fail and its relatives: If
            onnxruntime cannot read or run the file.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        mean: float | Sequence[float] = ARCFACE_MEAN,
        std: float | Sequence[float] = ARCFACE_STD,
    ) -> None:
        import onnxruntime as ort

        self.mean = _per_channel(mean, "mean")
        self.std = _per_channel(std, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std!r}")

        providers: list = ["CPUExecutionProvider"]
        self.device = "cpu"
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
                self.device = f"cuda:{index}"
            else:
                log.warning("onnxruntime has no CUDA provider here; running %s on the CPU", path)
        self._session = ort.InferenceSession(str(path), providers=providers)

        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected one input (the chips), the model has {len(inputs)}: {[i.name for i in inputs]}")
        self._input = inputs[0]
        shape = list(self._input.shape)
        if len(shape) != 4:
            raise ValueError(f"expected a 4-d image input, the model's input {self._input.name!r} has shape {shape}")
        if shape[1] == 3:
            self.layout, spatial = "NCHW", shape[2:4]
        elif shape[3] == 3:
            self.layout, spatial = "NHWC", shape[1:3]
        else:
            raise ValueError(f"input {self._input.name!r} of shape {shape} has no axis of 3 channels (NCHW or NHWC)")
        fixed = [side for side in spatial if isinstance(side, int)]
        if len(fixed) == 2 and fixed[0] != fixed[1]:
            raise ValueError(f"input {self._input.name!r} takes {fixed[0]}x{fixed[1]} chips; only square ones work")
        self.input_size = fixed[0] if fixed else DEFAULT_INPUT_SIZE
        self._batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        try:
            self.input_dtype = _INPUT_DTYPES[self._input.type]
        except KeyError:
            raise ValueError(f"input {self._input.name!r} is {self._input.type}; expected float or float16") from None

        # The embedding is the first output (some models add others, such as a quality score).
        self._output = self._session.get_outputs()[0].name

        # One probe run: proves the model runs and tells the embedding length.
        self.dim = self._forward(np.zeros((1, self.input_size, self.input_size, 3), dtype=np.uint8)).shape[1]

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        """Embeddings of a batch of chips.

        Args:
            chips: (N, S, S, 3) uint8 RGB chips, S = :attr:`input_size`, N >= 1.

        Returns:
            (N, dim) float32 embeddings as the model outputs them (not normalised here).

        Raises:
            ValueError: If the model's output does not hold one ``dim``-long embedding per chip.
        """
        out = self._forward(chips)
        if out.shape[1] != self.dim:
            raise ValueError(f"model returned {out.shape[1]}-d embeddings, {self.dim}-d at load")
        return out

    def _forward(self, chips: np.ndarray) -> np.ndarray:
        x = (chips.astype(np.float32) - self.mean) / self.std
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if self._batch is None:
            out = self._run(x)
        else:
            out = np.concatenate([self._run_padded(x[i : i + self._batch]) for i in range(0, len(x), self._batch)])
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output], {self._input.name: x})
        out = np.asarray(out)
        if out.ndim < 1 or out.shape[0] != len(x):
            raise ValueError(f"model returned shape {out.shape} for a batch of {len(x)}, not one embedding per chip")
        # Some exports keep trailing singleton axes, (N, D, 1, 1): an embedding per row either way.
        return out.astype(np.float32).reshape(len(x), -1)

    def _run_padded(self, x: np.ndarray) -> np.ndarray:
        count = len(x)
        if count < self._batch:
            x = np.concatenate([x, np.zeros((self._batch - count, *x.shape[1:]), dtype=x.dtype)])
        return self._run(x)[:count]


def _per_channel(value: float | Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.size not in (1, 3) or not np.isfinite(array).all():
        raise ValueError(f"{what} must be one finite number or three (R, G, B), got {value!r}")
    return np.broadcast_to(array, (3,)).copy()
