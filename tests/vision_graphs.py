"""ONNX graphs as other toolchains write them, built with onnx.helper (for normalisation and quantization tests).

`paddle_style_segmenter`: a DB-head-like text-detection model as Paddle2ONNX (opset 11) exports it: every weight in
a `Constant` node, BatchNormalization left after each Conv and between the two ConvTransposes, an explicit `Pad`
before the strided Conv, some nodes without names, a Sigmoid probability map out.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H = W = 32


def paddle_style_segmenter(*, opset: int = 11, seed: int = 0) -> onnx.ModelProto:
    """x (N, 3, 32, 32) -> probability map (N, 1, 32, 32)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    count = [0]

    def const(value: np.ndarray, hint: str) -> str:
        count[0] += 1
        name = f"{hint}_{count[0]}"
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_t")))
        return name

    def weight(*shape: int, scale: float = 0.3) -> str:
        fan_in = int(np.prod(shape[1:]))
        return const((rng.normal(size=shape) * scale / np.sqrt(fan_in) * 3).astype(np.float32), "w")

    def bn(x: str, channels: int, name: str | None) -> str:
        gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        beta = rng.normal(0, 0.2, channels).astype(np.float32)
        mean = rng.normal(0, 0.3, channels).astype(np.float32)
        var = rng.uniform(0.2, 2.0, channels).astype(np.float32)
        out = f"{x}_bn"
        nodes.append(helper.make_node("BatchNormalization", [x, const(gamma, "g"), const(beta, "b"), const(mean, "m"),
                                                             const(var, "v")], [out], epsilon=1e-5,
                                      name=name or ""))
        return out

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}_relu"]))
        return f"{x}_relu"

    nodes.append(helper.make_node("Conv", ["x", weight(8, 3, 3, 3)], ["c1"], pads=[1, 1, 1, 1], name="conv1"))
    h = relu(bn("c1", 8, "bn1"))
    pads = const(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    nodes.append(helper.make_node("Pad", [h, pads], ["padded"], mode="constant", name="pad2"))
    nodes.append(helper.make_node("Conv", ["padded", weight(16, 8, 3, 3)], ["c2"], strides=[2, 2], name="conv2"))
    h = relu(bn("c2", 16, None))  # unnamed, as some exporters leave them
    nodes.append(helper.make_node("ConvTranspose", [h, weight(16, 8, 2, 2)], ["t1"], strides=[2, 2],
                                  name="deconv1"))
    h = relu(bn("t1", 8, "bn_between"))  # the BatchNormalization between the two ConvTransposes
    nodes.append(helper.make_node("ConvTranspose", [h, weight(8, 1, 3, 3), const(np.zeros(1, np.float32), "b")],
                                  ["t2"], pads=[1, 1, 1, 1], name="deconv2"))
    nodes.append(helper.make_node("Sigmoid", ["t2"], ["prob"], name="sigmoid"))
    graph = helper.make_graph(nodes, "paddle_style", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    ["N", 3, H, W])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, H, W])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="paddle2onnx")
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """n inputs (1, 3, 32, 32): smooth random fields, like natural images after normalisation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
        out.append(np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3) + 0.1 * rng.normal(size=(1, 3, H, W))
                   .astype(np.float32))
    return out


def write_class_photos(root, count: int, *, grayscale: int = 0):
    """`count` smooth 64 x 48 PNGs (upscaled random 8 x 6 colour fields, seed 0) in two class folders `0` and `1`
    (image i in folder i % 2); the last `grayscale` of them saved as grayscale. Returns `root`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((64, 48), Image.Resampling.BICUBIC)
        if i >= count - grayscale:
            image = image.convert("L")
        folder = root / str(i % 2)
        folder.mkdir(exist_ok=True)
        image.save(folder / f"img{i}.png")
    return root
