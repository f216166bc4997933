"""ONNX files: loading user-supplied ones with one-line errors, and the one 2 GiB external-data rule for saving.

No torch import: bundles and probes use it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgepack.errors import BadInputError

_TWO_GIB = 2**31


def load_onnx_checked(path: Path) -> onnx.ModelProto:
    """Load (graph only) and check an ONNX file; a missing, truncated or non-ONNX file is a BadInputError."""
    if not path.is_file():
        raise BadInputError(f"ONNX model {path} does not exist; pass the path of an .onnx file "
                            "(edgepack export writes one)")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as err:  # protobuf's DecodeError and onnx's ValidationError share no useful base
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise BadInputError(f"{path} is not a valid ONNX model ({reason}); the file may be truncated — "
                            "re-export it with `edgepack export`") from None
    return model


def external_data_threshold() -> int:
    """Bytes of weights above which a model is saved with its weights in an external `<model>.onnx.data` file.

    Protobuf cannot serialise a message of 2 GiB or more, so every stage that writes a model (export, the
    calibration graph, SmoothQuant's rewrite, the quantizer, fp16 and fixed-shape copies) asks this one function;
    the 64 MiB margin leaves room for the graph itself and the outputs calibration adds. The environment variable
    EDGEPACK_EXTERNAL_DATA_BYTES lowers it, so the tests carry a small model through every stage as external data.
    """
    override = os.environ.get("EDGEPACK_EXTERNAL_DATA_BYTES")
    if override is None:
        return _TWO_GIB - 2**26
    try:
        value = int(override)
    except ValueError:
        raise BadInputError(f"EDGEPACK_EXTERNAL_DATA_BYTES={override!r} is not a number of bytes; unset it or give "
                            "an integer") from None
    return max(0, min(value, _TWO_GIB - 2**26))


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= external_data_threshold()


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Save `model` at `path`; its weights go to `<name>.data` beside it when `needs_external_data`."""
    if needs_external_data(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def externalize_if_large(path: Path) -> None:
    """Rewrite a saved model with external data when it is over the threshold (torch.onnx writes one file)."""
    if path.stat().st_size < external_data_threshold() or path.with_name(path.name + ".data").exists():
        return
    save_onnx(onnx.load(str(path)), path)


def model_bytes(path: Path) -> int:
    """Bytes of a model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
