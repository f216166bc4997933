"""`image-classifier`: pixels in; class logits out (or, task dense-prediction, maps such as detection / segmentation).

Sources: a Hugging Face `*ForImageClassification` folder (its `preprocessor_config.json` gives the preprocessing),
a torchvision-style `pkg.module:factory` (`model.family: image-classifier` with `model.preprocessing`), or an ONNX
file (an edgepack artifact reopens with its preprocessing; a foreign .onnx needs `model.family: image-classifier`).
Data is an image folder (`calibration_data.images`, decoded one image at a time) or, already preprocessed, an NPZ
with one array named after the input.

The preprocessing spec (`calibration_data.preprocess.ImagePreprocessing`) is resolved once and written into every
artifact's manifest, so quantize / validate / bundle of an exported model need no preprocessing flags.

Scores against the FP32 reference: image-classification reports logit cosine, top-1 agreement (same predicted
class) and top-5 agreement (the reference's class among the variant's five best); with labels, top-1 / top-5
accuracy over the labelled samples. dense-prediction reports the cosine / SQNR of every output (`<output>:` keys)
and, for probability maps (outputs in [0, 1], or `model.probability_outputs`), the IoU of the masks thresholded at
`model.mask_threshold`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from edgepack.calibration_data import Feed, ImageSample, Sample
from edgepack.calibration_data.preprocess import ImagePreprocessing, from_hf_config
from edgepack.errors import BadInputError
from edgepack.families.base import FamilyOptions, ModelFamily, ModelIO, ModelSource, TensorSpec, register_family
from edgepack.families.sequence_classifier import top1_agreement
from edgepack.reporter import get_reporter

_CLASSIFICATION, _DENSE = "image-classification", "dense-prediction"
_HF_FILES = ("config.json", "preprocessor_config.json")


class ImageClassifierOptions(FamilyOptions):
    #: how an image becomes the model input; null: the model folder's preprocessor_config.json, else the defaults
    preprocessing: ImagePreprocessing | None = None
    #: the graph / module input that takes the pixels
    input_name: str = "pixel_values"
    #: the module's outputs (a factory); the first is scored. HF folders and ONNX files name their own.
    outputs: list[str] = Field(default_factory=lambda: ["logits"])
    #: a text file of class names, one per line (line i = class i), so labels may be names
    class_names: str | None = None
    #: dense-prediction: outputs that are probability maps (default: every output whose values lie in [0, 1])
    probability_outputs: list[str] | None = None
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    dynamic_batch: bool = True


def _is_image_input(source: ModelSource) -> bool:
    """A plain ONNX file whose first input has rank 4 (NCHW / NHWC pixels)."""
    if source.kind != "onnx" or source.path is None:
        return False
    from edgepack.families.onnx_model import graph_io

    try:
        inputs = graph_io(source.path).inputs
    except BadInputError:
        return False
    return bool(inputs) and len(inputs[0].dims) == 4


@register_family
class ImageClassifier(ModelFamily):
    name = "image-classifier"
    tasks = (_CLASSIFICATION, _DENSE)
    quant_recipe = "auto"  # cnn for convolutional graphs, transformer-encoder for a ViT
    Options = ImageClassifierOptions

    @classmethod
    def recognize(cls, source: ModelSource) -> int:
        if source.kind == "hf-folder" and any(a.endswith("ForImageClassification") for a in source.architectures):
            return 20
        # chosen by `model.family: image-classifier` (torch-module / onnx win an automatic choice)
        return 1 if source.kind == "import-path" or _is_image_input(source) else 0

    def __init__(self, source: ModelSource, options: ImageClassifierOptions, *, task: str | None = None) -> None:
        super().__init__(source, options, task=task)
        if source.kind == "hf-folder":
            from edgepack.families.hf_text import check_model_folder

            assert source.path is not None  # inspect_source sets it for folders
            check_model_folder(source.path)
        self.preprocessing = options.preprocessing or self._hf_preprocessing() or ImagePreprocessing()
        self.options = options.model_copy(update={"preprocessing": self.preprocessing})  # travels resolved
        self._graph_io: ModelIO | None = None
        if source.kind == "onnx" and source.path is not None:
            from edgepack.families.onnx_model import graph_io

            self._graph_io = graph_io(source.path)
            self._check_graph_input(self._graph_io)
        self._class_names: list[str] | None = None
        self._gray_noted = False

    def _hf_preprocessing(self) -> ImagePreprocessing | None:
        folder = self.source.folder
        config = folder / "preprocessor_config.json" if folder is not None else None
        return from_hf_config(config) if config is not None and config.is_file() else None

    def _check_graph_input(self, io: ModelIO) -> None:
        spec = next((t for t in io.inputs if t.name == self.options.input_name), None)
        if spec is None:
            names = ", ".join(io.input_names) or "none"
            raise BadInputError(f"{self.source.text}: no input '{self.options.input_name}' (inputs: {names}); set "
                                "model.input_name to the pixel input")
        expected = tuple(spec.dims[1:])
        got = self.preprocessing.input_shape
        if len(expected) != len(got) or any(isinstance(e, int) and e != g for e, g in zip(expected, got, strict=False)):
            raise BadInputError(f"{self.source.text}: preprocessing gives {list(got)} per image "
                                f"({self.preprocessing.layout}), input '{spec.name}' expects "
                                f"{[str(d) for d in expected]}; set model.preprocessing (crop / resize, layout, "
                                "channels) to the model's input")

    # ---------------------------------------------------------------------------------------------- export

    @property
    def io(self) -> ModelIO:
        if self._graph_io is not None:
            names = self._graph_io.output_names
            primary = next((n for n in self.options.outputs if n in names), names[0])
            return ModelIO(self._graph_io.inputs, self._graph_io.outputs, primary_output=primary)
        batch: int | str = "batch" if self.options.dynamic_batch else 1
        dtype = self.preprocessing.dtype
        inputs = (TensorSpec(self.options.input_name, (batch, *self.preprocessing.input_shape), dtype),)
        outputs = tuple(TensorSpec(name, (batch,), atol=1e-3, min_cosine=0.9999) for name in self.options.outputs)
        return ModelIO(inputs, outputs, primary_output=self.options.outputs[0])

    def load_torch(self) -> Any:
        if self.source.kind == "hf-folder":
            module = _hf_logits(self.source.path)
        elif self.source.kind == "import-path":
            from edgepack.families.torch_module import load_factory

            module = load_factory(self.source.text)
        else:
            return super().load_torch()
        self._check_torch_input(module)
        return module

    def _check_torch_input(self, module: Any) -> None:
        """One forward on a zero image of the preprocessing's shape: a size the module cannot take is one line."""
        import torch

        shape = [1, *self.preprocessing.input_shape]
        dtype = getattr(torch, self.preprocessing.dtype)
        try:
            with torch.no_grad():
                module(torch.zeros(shape, dtype=dtype))
        except (RuntimeError, ValueError) as err:
            reason = str(err).splitlines()[0][:160]
            raise BadInputError(f"{self.source.text} cannot take the preprocessed image shape {shape} ({reason}); set "
                                "model.preprocessing (crop / resize, channels, layout) to the input the model "
                                "expects") from None

    def artifact_files(self) -> list[tuple[Path, str]]:
        folder = self.source.folder
        files = []
        if folder is not None and self.source.kind in ("hf-folder", "onnx"):
            files = [(folder / name, name) for name in _HF_FILES if (folder / name).is_file()]
        if self.options.class_names:
            files.append((self._class_names_path(), "class_names.txt"))
        return files

    def artifact_record(self) -> dict[str, Any]:
        record = super().artifact_record()
        if self.options.class_names:  # it travels beside the model now
            record["options"] = {**record["options"], "class_names": "class_names.txt"}
        return record

    # ------------------------------------------------------------------------------------------------ data

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        name = self.options.input_name
        batch: list[np.ndarray] = []
        gray = 0
        for index, sample in enumerate(samples):
            array, was_gray = self._pixels(sample, index)
            gray += was_gray
            batch.append(array)
            if len(batch) == batch_size:
                yield {name: np.stack(batch)}
                batch = []
        if batch:
            yield {name: np.stack(batch)}
        if gray and not self._gray_noted and self.preprocessing.channels == 3:
            get_reporter().info(f"- {gray} grayscale image(s) given to an RGB model: the gray channel is repeated "
                                "into R, G and B")
            self._gray_noted = True

    def _pixels(self, sample: Sample, index: int) -> tuple[np.ndarray, bool]:
        expected = self.preprocessing.input_shape
        if isinstance(sample, ImageSample):
            image = sample.load()
            gray = image.mode in ("L", "LA", "1", "I", "I;16", "F")
            return self.preprocessing.apply(image, seed=sample.mode_seed), gray
        if not isinstance(sample, dict):
            raise BadInputError(f"family {self.name} needs images (a folder of png / jpg files) or arrays (an .npz "
                                f"with '{self.options.input_name}'), got text")
        if self.options.input_name not in sample:
            raise BadInputError(f"sample {index} has no array '{self.options.input_name}' (has: {', '.join(sample)});"
                                " name the NPZ array after the model input")
        array = np.asarray(sample[self.options.input_name])
        if tuple(array.shape) != tuple(expected):
            raise BadInputError(f"input '{self.options.input_name}': sample {index} has shape {list(array.shape)}, the "
                                f"model's preprocessing gives {list(expected)} ({self.preprocessing.layout}); "
                                "preprocess the arrays to that shape or fix model.preprocessing")
        return array.astype(self.preprocessing.dtype), False

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        return next(self.feeds(samples[:1], batch_size=1))

    # --------------------------------------------------------------------------------------------- scoring

    def fidelity(self, reference: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
        metrics = super().fidelity(reference, outputs)
        if self.task == _DENSE:
            metrics.update(dense_fidelity(reference, outputs, probability=self.options.probability_outputs,
                                          threshold=self.options.mask_threshold))
            return metrics
        metrics["top1_agreement"] = top1_agreement(reference, outputs, output=self.primary_output)
        metrics["top5_agreement"] = topk_agreement(reference, outputs, output=self.primary_output, k=5)
        return metrics

    def task_metrics(self, outputs: Sequence[Mapping[str, np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        if self.task == _DENSE or not outputs or len(outputs) != len(samples):
            return {}
        labelled = [(o, label) for o, s in zip(outputs, samples, strict=True)
                    if (label := _label_of(s)) is not None]
        if not labelled:
            return {}
        logits = np.concatenate([o[self.primary_output].reshape(len(o[self.primary_output]), -1) for o, _ in labelled])
        ids = np.asarray([self._class_id(label) for _, label in labelled])
        top5 = np.argsort(-logits, axis=1)[:, :5]
        return {"top1_accuracy": float(np.mean(top5[:, 0] == ids)),
                "top5_accuracy": float(np.mean((top5 == ids[:, None]).any(axis=1)))}

    def _class_id(self, label: str | int) -> int:
        if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.isdigit()):
            return int(label)
        names = self.class_names()
        key = _normal(label)
        lookup = {_normal(n): i for i, n in enumerate(names)}
        if key not in lookup:
            raise BadInputError(f"label {label!r} is neither a class index nor one of the model's {len(names)} class "
                                "names; use indices, or set model.class_names to a file of names (one per line)")
        return lookup[key]

    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = self._read_class_names()
        return self._class_names

    def _class_names_path(self) -> Path:
        path = Path(self.options.class_names or "")
        if not path.is_absolute() and self.source.folder is not None and (self.source.folder / path).is_file():
            path = self.source.folder / path
        if not path.is_file():
            raise BadInputError(f"model.class_names {path}: no such file (one class name per line)")
        return path

    def _read_class_names(self) -> list[str]:
        if self.options.class_names:
            return [line.strip() for line in self._class_names_path().read_text().splitlines()]
        id2label = (self.source.config or {}).get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _label_of(sample: Sample) -> str | int | None:
    if isinstance(sample, ImageSample):
        return sample.label
    if isinstance(sample, dict) and "labels" in sample:
        return int(np.asarray(sample["labels"]).reshape(-1)[0])
    return None


def _hf_logits(folder: Path | None) -> Any:
    import torch
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)

    class Logits(torch.nn.Module):
        """pixel_values (B, C, H, W) -> logits (B, K)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).logits

    return Logits().eval()


# ------------------------------------------------------------------------------------------------- metrics


def topk_agreement(reference: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]], *,
                   output: str, k: int) -> float:
    """Share of rows whose reference top-1 class is among the variant's k highest logits."""
    ref = np.concatenate([r[output].reshape(len(r[output]), -1) for r in reference])
    got = np.concatenate([o[output].reshape(len(o[output]), -1) for o in outputs])
    best = ref.argmax(axis=1)
    top = np.argsort(-got, axis=1)[:, : min(k, got.shape[1])]
    return float(np.mean((top == best[:, None]).any(axis=1)))


def mask_iou(reference: np.ndarray, variant: np.ndarray, *, threshold: float) -> np.ndarray:
    """IoU of the masks `reference > threshold` and `variant > threshold` per batch row (1.0 when both empty)."""
    a = (reference > threshold).reshape(len(reference), -1)
    b = (variant > threshold).reshape(len(variant), -1)
    union = (a | b).sum(axis=1)
    inter = (a & b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dense_fidelity(reference: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]], *,
                   probability: Sequence[str] | None, threshold: float) -> dict[str, float]:
    """Per output: `<name>:cosine_mean`, `<name>:sqnr_db`; for probability maps `<name>:mask_iou` (mean over rows)
    and `mask_iou` (the mean over probability outputs)."""
    from edgepack.runtime.metrics import fidelity

    names = list(reference[0]) if reference else []
    metrics: dict[str, float] = {}
    ious = []
    for name in names:
        one = fidelity(reference, outputs, output=name)
        metrics[f"{name}:cosine_mean"] = one["cosine_mean"]
        metrics[f"{name}:sqnr_db"] = one["sqnr_db"]
        is_probability = name in probability if probability is not None else all(
            float(r[name].min()) >= 0.0 and float(r[name].max()) <= 1.0 for r in reference)
        if is_probability:
            iou = float(np.concatenate([mask_iou(r[name], o[name], threshold=threshold)
                                        for r, o in zip(reference, outputs, strict=True)]).mean())
            metrics[f"{name}:mask_iou"] = iou
            ious.append(iou)
    if ious:
        metrics["mask_iou"] = float(np.mean(ious))
    return metrics
