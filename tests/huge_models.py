"""Models over 2 GB for `make test-slow` (importable as `tests.huge_models:make_big_mlp`), and ONNX MLPs of any size.

The torch module is built a layer at a time under no_grad, seeded, so its 2.4 GB of weights are the same on
every run (the ONNX file's sha256 is reproducible) and no gradient buffers are allocated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: 9 layers of 8192 x 8192 float32: 9 * 256 MiB = 2.25 GiB of weights, past protobuf's 2 GiB
BIG_LAYERS, BIG_WIDTH = 9, 8192


def make_big_mlp():  # -> torch.nn.Module
    import torch

    class BigMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(BIG_WIDTH, BIG_WIDTH, bias=False)
                                              for _ in range(BIG_LAYERS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8192) -> (B, 8192)
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    with torch.no_grad():
        return BigMLP().eval().requires_grad_(False)


def _mlp_weights(layers: int, width: int) -> Iterator[np.ndarray]:
    """Seeded weights scaled to keep activations O(1), one layer at a time."""
    rng = np.random.default_rng(0)
    for _ in range(layers):
        yield rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2 / width))


def _save_mlp(path: Path, inits: list, width: int) -> Path:
    """x (batch, width) -> MatMul/Relu per initializer in `inits` -> y, named nodes, saved at `path`."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh

    nodes, x = [], "x"
    for i in range(len(inits)):
        out = "y" if i == len(inits) - 1 else f"r{i}"
        nodes += [oh.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"matmul{i}"),
                  oh.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}")]
        x = out
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_onnx_mlp(path: Path, *, layers: int, width: int) -> Path:
    """x (batch, width) -> MatMul/Relu x `layers` -> y, named nodes, seeded weights scaled to keep activations O(1)."""
    from onnx import numpy_helper

    inits = [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(_mlp_weights(layers, width))]
    return _save_mlp(path, inits, width)


def make_onnx_mlp_external(path: Path, *, layers: int, width: int) -> Path:
    """`make_onnx_mlp` with its weights written to `<name>.data` a layer at a time (memory: one layer)."""
    from onnx import TensorProto

    inits = []
    with open(path.with_name(path.name + ".data"), "wb") as data:
        for i, weight in enumerate(_mlp_weights(layers, width)):
            tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=weight.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name + ".data"), ("offset", str(data.tell())),
                               ("length", str(weight.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            data.write(weight.tobytes())
            inits.append(tensor)
    return _save_mlp(path, inits, width)
