"""Loading user-supplied ONNX files with one-line errors (no torch import: bundles and probes use it too)."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgepack.errors import BadInputError


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
