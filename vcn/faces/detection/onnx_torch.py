"""Runs a small ONNX convolutional network as a torch module, so it can run on a CUDA GPU.

The detector's weights ship as an ONNX graph (``retinaface.weights``). ONNX
Runtime runs it on the CPU; its GPU build (``onnxruntime-gpu``) is a separate
package that may not match the machine's CUDA. Torch is already there for the
face-ID model, so this module executes the graph with torch operations instead:
the initialisers become buffers, and the nodes run in their (topological) order.

Only the operators RetinaFace-MobileNet's export uses are supported, with the
attribute values it uses; anything else raises :class:`UnsupportedGraphError`
when the module is built, never a wrong answer at run time. Shape arithmetic
(``Shape``, ``Gather``, ``Concat`` of shapes, ...) is done on small numpy arrays,
so the network's outputs are the only tensors on the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vcn.errors import VcnError

#: Operators this runner executes.
SUPPORTED = frozenset(
    {
        "Add", "Cast", "Concat", "Constant", "Conv", "Gather", "Identity", "LeakyRelu", "Relu", "Reshape",
        "Resize", "Shape", "Slice", "Softmax", "Transpose", "Unsqueeze",
    }
)


class UnsupportedGraphError(VcnError, ValueError):
    """The ONNX graph uses an operator or attribute this runner does not implement."""


class OnnxModule(nn.Module):
    """An ONNX graph of :data:`SUPPORTED` operators as a torch module.

    Args:
        model_bytes: The serialised ONNX model.

    Raises:
        UnsupportedGraphError: On an operator or attribute value outside what is implemented.
    """

    def __init__(self, model_bytes: bytes) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(model_bytes)
        graph = model.graph
        self.input_names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.output_names = [o.name for o in graph.output]
        self._names: dict[str, str] = {}
        for k, tensor in enumerate(graph.initializer):
            array = numpy_helper.to_array(tensor)
            if array.dtype.kind == "f":
                self.register_buffer(f"w{k}", torch.from_numpy(array.astype(np.float32)))
                self._names[tensor.name] = f"w{k}"
        self._constants: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in self._names
        }
        self._nodes = []
        for node in graph.node:
            if node.op_type not in SUPPORTED:
                raise UnsupportedGraphError(f"ONNX operator {node.op_type!r} (node {node.name!r}) is not supported")
            attrs = {}
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    attrs[a.name] = numpy_helper.to_array(a.t)
                else:
                    value = onnx.helper.get_attribute_value(a)
                    attrs[a.name] = value.decode() if isinstance(value, bytes) else value
            _check_attributes(node.op_type, attrs, node.name)
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The graph's outputs, in its output order, for the single input ``x``."""
        values: dict[str, torch.Tensor | np.ndarray] = dict(self._constants)
        for name, buffer in self._names.items():
            values[name] = getattr(self, buffer)
        values[self.input_names[0]] = x
        for op, inputs, outputs, attrs in self._nodes:
            args = [values[name] if name else None for name in inputs]
            values[outputs[0]] = _run(op, args, attrs, x.dtype)
        return [values[name] for name in self.output_names]


def _check_attributes(op: str, attrs: dict, name: str) -> None:
    def refuse(what: str) -> None:
        raise UnsupportedGraphError(f"ONNX {op} node {name!r}: {what} is not supported")

    if op == "Conv":
        if attrs.get("auto_pad", "NOTSET") != "NOTSET":
            refuse(f"auto_pad {attrs['auto_pad']}")
        pads = attrs.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            refuse(f"asymmetric pads {pads}")
    elif op == "Resize":
        if attrs.get("mode") != "nearest" or attrs.get("coordinate_transformation_mode") != "asymmetric" \
                or attrs.get("nearest_mode", "round_prefer_floor") != "floor":
            refuse(f"mode {attrs}")


def _run(op: str, args: list, attrs: dict, dtype: torch.dtype):
    if op == "Identity":
        return args[0]
    if op == "Constant":
        return attrs["value"]
    if op == "Conv":
        x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
        pads = attrs.get("pads", [0, 0, 0, 0])
        return F.conv2d(
            x, weight.to(dtype), None if bias is None else bias.to(dtype),
            stride=tuple(attrs.get("strides", [1, 1])), padding=tuple(pads[:2]),
            dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1),
        )
    if op == "LeakyRelu":
        return F.leaky_relu(args[0], attrs.get("alpha", 0.01))
    if op == "Relu":
        return F.relu(args[0])
    if op == "Add":
        return args[0] + args[1]
    if op == "Softmax":
        return F.softmax(args[0], dim=attrs.get("axis", -1))
    if op == "Transpose":
        return args[0].permute(*attrs["perm"])
    if op == "Shape":
        return np.array(args[0].shape, dtype=np.int64)
    if op == "Gather":
        return np.take(args[0], args[1], axis=attrs.get("axis", 0))
    if op == "Unsqueeze":
        return np.expand_dims(args[0], tuple(attrs["axes"]))
    if op == "Cast":
        return args[0].astype(np.int64 if attrs["to"] == 7 else np.float32)
    if op == "Slice":
        data, starts, ends = args[0], args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else np.arange(len(starts))
        index = [slice(None)] * data.ndim
        for axis, start, end in zip(axes, starts, ends):
            index[int(axis)] = slice(int(start), int(end))
        return data[tuple(index)]
    if op == "Concat":
        if all(isinstance(a, np.ndarray) for a in args):
            return np.concatenate(args, axis=attrs["axis"])
        return torch.cat(args, dim=attrs["axis"])
    if op == "Reshape":
        return args[0].reshape(tuple(int(v) for v in args[1]))
    if op == "Resize":
        sizes = args[3] if len(args) > 3 else None
        if sizes is None or len(sizes) == 0:
            raise UnsupportedGraphError("Resize by scales is not supported, only by sizes")
        # ONNX nearest with asymmetric coordinates and floor is torch's "nearest".
        return F.interpolate(args[0], size=tuple(int(v) for v in sizes[-2:]), mode="nearest")
    raise UnsupportedGraphError(f"ONNX operator {op!r} is not supported")
