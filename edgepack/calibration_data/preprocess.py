"""Image preprocessing stated as data: resize, crop, scale / normalise, channel order, layout, dtype.

A model's preprocessing is part of the model: the same spec turns calibration, evaluation and golden-vector images
into inputs, travels in the artifact's manifest (so quantize / validate / bundle need no flags), and is read from a
Hugging Face `preprocessor_config.json` when the model folder has one (`from_hf_config`).

The pixel formula is `(x * scale + offset - mean) / std` per channel, on x in [0, 255]: ImageNet-normalised
torchvision models are `scale: 1/255, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]`, EfficientNet-Lite
(TF) is `scale: 1, mean: 127, std: 128`, a `[-1, 1]` model is `scale: 1/127.5, offset: -1`. `dtype: uint8` feeds the
raw pixels (no normalisation), for models that take bytes.

>>> spec = ImagePreprocessing(resize=256, crop=224)
>>> spec.input_shape
(3, 224, 224)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepack.artifacts import read_json_object
from edgepack.errors import BadInputError

#: PIL's resampling filter codes (Image.Resampling), as HF preprocessor configs store them.
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImagePreprocessing(BaseModel):
    """How an image becomes one model input (per sample, without the batch dimension)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: int: resize so the shorter side is this long (aspect kept); [height, width]: resize to exactly that;
    #: null: no resize
    resize: int | list[int] | None = 256
    #: output [height, width] (an int: square); null: the resized image as it is
    crop: int | list[int] | None = 224
    #: center: the middle of the resized image; random: a position drawn per sample (seeded by the sample)
    crop_mode: Literal["center", "random"] = "center"
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"
    scale: float = 1 / 255
    offset: float = 0.0
    mean: float | list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: float | list[float] = Field(default_factory=lambda: list(IMAGENET_STD))
    channels: Literal[1, 3] = 3
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16", "uint8"] = "float32"

    @field_validator("resize", "crop")
    @classmethod
    def _positive(cls, value: int | list[int] | None) -> int | list[int] | None:
        sizes = [value] if isinstance(value, int) else (value or [])
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("give one size (an int) or [height, width]")
        if any(s < 1 for s in sizes):
            raise ValueError("sizes must be >= 1 pixel")
        return value

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, value: float | list[float]) -> float | list[float]:
        if any(s == 0 for s in (value if isinstance(value, list) else [value])):
            raise ValueError("std must not be 0")
        return value

    @model_validator(mode="after")
    def _per_channel_lengths(self) -> ImagePreprocessing:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) not in (1, self.channels):
                raise ValueError(f"{name} has {len(value)} values for {self.channels} channel(s)")
        if self.resize is None and self.crop is None:
            raise ValueError("state at least one of resize and crop: a model input has a fixed size")
        return self

    # --------------------------------------------------------------------------------------------- shapes

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if self.crop is not None:
            return _pair(self.crop)
        if isinstance(self.resize, list):
            return _pair(self.resize)
        raise BadInputError("preprocessing: resize to a shorter side without a crop has no fixed size; add crop "
                            "(e.g. crop: 224) or resize: [height, width]")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample's input shape: (C, H, W) for NCHW, (H, W, C) for NHWC."""
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def describe(self) -> str:
        return (f"resize {self.resize}, crop {self.crop} ({self.crop_mode}), {self.interpolation}, "
                f"(x*{self.scale:g}{self.offset:+g} - mean {self.mean}) / std {self.std}, {self.channel_order}, "
                f"{self.layout}, {self.dtype}")

    # ------------------------------------------------------------------------------------------ applying it

    def apply(self, image: Any, *, seed: int = 0) -> np.ndarray:
        """A PIL image (any mode) -> one input array of `input_shape` and `dtype`."""
        from PIL import Image

        image = image.convert("L" if self.channels == 1 else "RGB")
        image = self._resize(image, Image)
        image = self._crop(image, seed)
        pixels = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channel_order == "BGR":
            pixels = pixels[:, :, ::-1]
        if self.dtype == "uint8":
            out = np.ascontiguousarray(pixels)
        else:
            values = pixels.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
            out = (values - _vector(self.mean)) / _vector(self.std)  # (H, W, C)
            out = out.astype(self.dtype)
        return np.ascontiguousarray(out.transpose(2, 0, 1) if self.layout == "NCHW" else out)

    def _resize(self, image: Any, pil: Any) -> Any:
        if self.resize is None:
            return image
        width, height = image.size
        if isinstance(self.resize, list):
            target = (self.resize[1], self.resize[0])
        else:
            # the shorter side becomes `resize`, the longer one int(long * resize / short): torchvision's and HF's rule
            short = min(width, height)
            target = ((self.resize, max(1, int(height * self.resize / short))) if width <= height
                      else (max(1, int(width * self.resize / short)), self.resize))
        resample = getattr(pil.Resampling, self.interpolation.upper())
        return image.resize(target, resample) if target != (width, height) else image

    def _crop(self, image: Any, seed: int) -> Any:
        if self.crop is None:
            return image
        ch, cw = _pair(self.crop)
        width, height = image.size
        if width < cw or height < ch:
            # smaller than the crop: scale it up first so the crop fits (torchvision pads instead; edges matter less)
            factor = max(cw / width, ch / height)
            image = image.resize((math.ceil(width * factor), math.ceil(height * factor)))
            width, height = image.size
        if self.crop_mode == "random":
            rng = np.random.default_rng(seed)
            left, top = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
        else:
            left, top = (width - cw) // 2, (height - ch) // 2
        return image.crop((left, top, left + cw, top + ch))


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _vector(value: float | list[float]) -> np.ndarray:
    return np.asarray(value if isinstance(value, list) else [value], dtype=np.float32)


# ------------------------------------------------------------------------------------------- Hugging Face


def from_hf_config(path: Path) -> ImagePreprocessing:
    """The spec a Hugging Face `preprocessor_config.json` states (ViT, ConvNeXt, ResNet, MobileNet image
    processors): size / shortest_edge, crop_pct, crop_size, rescale_factor, image_mean / image_std, resample."""
    config = read_json_object(path, written_by="the image processor's `save_pretrained`")
    resize, crop = _hf_sizes(config, path)
    fields: dict[str, Any] = {"resize": resize, "crop": crop}
    fields["interpolation"] = _PIL_FILTERS.get(int(config.get("resample", 2)), "bilinear")
    fields["scale"] = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    if config.get("do_normalize", True):
        fields["mean"] = list(config.get("image_mean", IMAGENET_MEAN))
        fields["std"] = list(config.get("image_std", IMAGENET_STD))
    else:
        fields["mean"], fields["std"] = 0.0, 1.0
    try:
        return ImagePreprocessing.model_validate(fields)
    except ValueError as err:
        raise BadInputError(f"{path}: cannot turn it into an edgepack preprocessing spec ({err}); state "
                            "model.preprocessing in the recipe instead") from None


def _hf_sizes(config: dict[str, Any], path: Path) -> tuple[int | list[int] | None, int | list[int] | None]:
    size = config.get("size", 224)
    crop_size = config.get("crop_size")
    do_resize = config.get("do_resize", True)
    do_crop = config.get("do_center_crop", crop_size is not None)
    if isinstance(size, dict):
        if "shortest_edge" in size:
            resize: int | list[int] | None = int(size["shortest_edge"])
            if "crop_pct" in config and config["crop_pct"] is not None and not do_crop and resize < 384:
                # ConvNeXt: resize to shortest_edge / crop_pct, then a center crop of shortest_edge
                crop = resize
                return int(resize / float(config["crop_pct"])), crop
        elif "height" in size and "width" in size:
            resize = [int(size["height"]), int(size["width"])]
        else:
            raise BadInputError(f"{path}: size {size} has neither shortest_edge nor height/width")
    else:
        resize = int(size)
        resize = [resize, resize]
    if not do_resize:
        resize = None
    crop: int | list[int] | None = None
    if do_crop and crop_size is not None:
        crop = ([int(crop_size["height"]), int(crop_size["width"])] if isinstance(crop_size, dict)
                else int(crop_size))
    return resize, crop
