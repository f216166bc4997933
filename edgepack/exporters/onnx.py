"""Export a model adapter's torch module to ONNX and check ONNX Runtime against PyTorch on real samples.

We call `torch.onnx.export` (TorchScript path, `dynamo=False`) directly rather than optimum-onnx:
optimum-onnx 0.1.0 pins transformers<4.58, does not export our pooling head, and its graphs trip
`quant_pre_process` ("Incomplete symbolic shape inference"). The TorchScript exporter gives plain
MatMul/Softmax/LayerNormalization graphs that ORT's quantizer and the mobile EPs handle.

What to export is the family's `ModelIO` (names, dynamic axes, per-output tolerance), stated as data. The check
collects every output's mismatch, then raises one `ExportMismatchError` listing them all.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from edgepack.calibration_data import Feed
from edgepack.errors import EdgepackError
from edgepack.families import ModelFamily
from edgepack.onnx_files import externalize_if_large
from edgepack.runtime.metrics import cosine_rows


class ExportMismatchError(EdgepackError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance on at least one output."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    #: max |onnx - torch| allowed on every output; None: each output's own tolerance (`TensorSpec.atol`)
    atol: float | None = None


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The TorchScript exporter warns about traced constants that are fine for our fixed-rank inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(family: ModelFamily, out_path: Path, *, check_feeds: Sequence[Feed],
                options: ExportOptions = ExportOptions()) -> dict[str, object]:
    """Write `out_path` (.onnx, external data when > 2 GB) and return the check's metrics."""
    io = family.io
    module = family.load_torch().eval()
    example = check_feeds[0]
    args = tuple(torch.from_numpy(example[name]) for name in io.input_names)
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(module, args, str(out_path), input_names=io.input_names, output_names=io.output_names,
                          dynamic_axes=io.dynamic_axes, opset_version=options.opset, dynamo=False)
    module.eval()  # the exporter restores the module's previous training flag; keep it in eval for the check
    externalize_if_large(out_path)
    onnx.checker.check_model(str(out_path))
    checks = check_against_torch(module, out_path, family=family, feeds=check_feeds, options=options)
    params = sum(p.numel() for p in module.parameters())
    return {"opset": options.opset, "parameters": params, "check": checks}


def check_against_torch(module: torch.nn.Module, onnx_path: Path, *, family: ModelFamily,
                        feeds: Sequence[Feed], options: ExportOptions) -> dict[str, dict[str, float]]:
    """Max abs diff and min cosine per output over `feeds`; raise one error listing every output out of tolerance."""
    import onnxruntime as ort

    io = family.io
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, dict[str, float]] = {n: {"max_abs_diff": 0.0, "cosine_min": 1.0} for n in io.output_names}
    for feed in feeds:
        onnx_out = session.run(io.output_names, feed)
        with torch.no_grad():
            torch_out = module(*(torch.from_numpy(feed[n]) for n in io.input_names))
        if isinstance(torch_out, torch.Tensor):  # single-output modules return a bare tensor
            torch_out = (torch_out,)
        for name, got, want in zip(io.output_names, onnx_out, torch_out, strict=True):
            want = want.numpy()
            entry = worst[name]
            entry["max_abs_diff"] = max(entry["max_abs_diff"], float(np.abs(got - want).max()))
            entry["cosine_min"] = min(entry["cosine_min"], float(cosine_rows(got, want).min()))
    bad = []
    for name, e in worst.items():
        spec = io.output(name)
        atol = spec.atol if options.atol is None else options.atol
        e.update(atol=atol)
        if e["max_abs_diff"] > atol or e["cosine_min"] < spec.min_cosine:
            bad.append(f"{name}: max |diff| {e['max_abs_diff']:.3g} (atol {atol:g}), min cosine "
                       f"{e['cosine_min']:.6f} (at least {spec.min_cosine})")
    if bad:
        raise ExportMismatchError(f"{onnx_path.name}: ONNX Runtime disagrees with PyTorch on {len(feeds)} samples: "
                                  + "; ".join(bad) + "; try another opset (--opset) or report the model")
    return worst
