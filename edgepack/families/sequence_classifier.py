"""`sequence-classifier`: a Hugging Face `*ForSequenceClassification` folder, token ids in, `logits` out.

Fidelity against the FP32 reference is the logit cosine plus top-1 agreement (the share of samples whose predicted
class is the reference's); with labelled data (`data.label_field`, a class index or a name from the config's
`id2label`) the task metric is accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgepack.calibration_data import Sample, TextSample
from edgepack.errors import BadInputError
from edgepack.families.base import FamilyOptions, ModelIO, ModelSource, TensorSpec, register_family
from edgepack.families.hf_text import HFTextFamily, is_head_architecture


def _classifier(model: Any, input_names: list[str]) -> Any:
    import torch

    class Logits(torch.nn.Module):
        """Positional inputs for export; returns the logits tensor (B, K)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(input_names, inputs, strict=True))).logits

    return Logits().eval()


def top1_agreement(reference: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]], *,
                   output: str) -> float:
    """Share of rows whose argmax equals the reference's (logits (B, K) per feed)."""
    ref = np.concatenate([r[output].reshape(len(r[output]), -1).argmax(axis=1) for r in reference])
    got = np.concatenate([o[output].reshape(len(o[output]), -1).argmax(axis=1) for o in outputs])
    return float(np.mean(ref == got))


def accuracy(predicted: np.ndarray, labels: Sequence[Any], *, label2id: Mapping[str, int], where: str) -> float:
    """Accuracy of class indices `predicted` against labels given as indices or class names."""
    ids = []
    for label in labels:
        if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.isdigit()):
            ids.append(int(label))
        elif label in label2id:
            ids.append(int(label2id[label]))
        else:
            raise BadInputError(f"{where}: label {label!r} is neither a class index nor one of the model's labels "
                                f"({', '.join(label2id) or 'none'}); fix data.label_field or the labels")
    return float(np.mean(predicted == np.asarray(ids)))


@register_family
class SequenceClassifier(HFTextFamily):
    name = "sequence-classifier"
    tasks = ("text-classification",)
    weight_only_fidelity = "cosine"
    quant_recipe = "transformer-encoder"
    compress_task = "sequence-classification"
    Options = FamilyOptions

    @classmethod
    def recognize(cls, source: ModelSource) -> int:
        return 20 if source.kind == "hf-folder" and is_head_architecture(source, ("ForSequenceClassification",)) else 0

    @property
    def num_labels(self) -> int:
        return len(self.config.get("id2label") or {}) or int(self.config.get("num_labels", 2))

    @property
    def io(self) -> ModelIO:
        inputs = tuple(TensorSpec(n, ("batch", "sequence"), "int64") for n in self.text_inputs())
        return ModelIO(inputs, (TensorSpec("logits", ("batch", self.num_labels), atol=1e-3),), primary_output="logits")

    def load_torch(self) -> Any:
        if self.source.kind != "hf-folder":
            return super().load_torch()
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                                                   attn_implementation="eager")
        return _classifier(model, self.io.input_names)

    def fidelity(self, reference: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
        return {**super().fidelity(reference, outputs),
                "top1_agreement": top1_agreement(reference, outputs, output="logits")}

    def task_metrics(self, outputs: Sequence[Mapping[str, np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        labels = [s.label for s in samples if isinstance(s, TextSample)]
        if not outputs or not labels or any(label is None for label in labels) or len(labels) != len(outputs):
            return {}
        predicted = np.concatenate([o["logits"].argmax(axis=1) for o in outputs])
        label2id = {str(k): int(v) for k, v in (self.config.get("label2id") or {}).items()}
        return {"accuracy": accuracy(predicted, labels, label2id=label2id, where=self.source.text)}
