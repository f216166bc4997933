"""`onnx-file`: an exported .onnx model with no framework behind it (for `edgepack quantize` / `validate`).

Inputs and outputs come from the graph. Text data is tokenized with the tokenizer folder the user names;
array data (NPZ) is cast to each input's ONNX dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgepack.calibration_data import Feed, Sample, TextSample, array_batches, tokenize_batches
from edgepack.errors import BadInputError
from edgepack.models.base import ADAPTERS, ModelAdapter
from edgepack.models.hf_encoder import paraphrase_retrieval
from edgepack.onnx_files import load_onnx_checked


@ADAPTERS.register("onnx-file")
class OnnxFileAdapter(ModelAdapter):
    kind = "onnx-file"

    def __init__(self, source: str, *, tokenizer: str | None = None) -> None:
        super().__init__(source)
        model = load_onnx_checked(Path(source))
        initializers = {i.name for i in model.graph.initializer}
        self._inputs = [i for i in model.graph.input if i.name not in initializers]
        self._outputs = [o.name for o in model.graph.output]
        self.primary_output = "sentence_embedding" if "sentence_embedding" in self._outputs else self._outputs[0]
        self.tokenizer_dir = tokenizer
        self._tokenizer: Any = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {}

    def load_torch(self) -> torch.nn.Module:
        raise BadInputError(f"{self.source} is already ONNX; there is no PyTorch module to export")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise BadInputError("text data needs a tokenizer: pass --tokenizer DIR (the model's Hugging Face "
                                    "folder), or give arrays in an .npz named after the model inputs")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
        return self._tokenizer

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        if samples and isinstance(samples[0], TextSample):
            return tokenize_batches(self.tokenizer, [s.text for s in samples if isinstance(s, TextSample)],
                                    batch_size=batch_size, max_length=max_length, padding=padding,
                                    input_names=self.input_names)
        return array_batches([self._cast(s, i) for i, s in enumerate(samples)], batch_size=batch_size)

    def evaluation_feeds(self, samples: Sequence[Sample], *, max_length: int) -> list[Feed]:
        feeds = list(self.feeds(samples, batch_size=1, max_length=max_length))
        pairs = [s.pair for s in samples if isinstance(s, TextSample) and s.pair]
        if pairs and len(pairs) == len(samples):
            feeds += list(self.feeds([TextSample(p) for p in pairs], batch_size=1, max_length=max_length))
        return feeds

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        if samples and isinstance(samples[0], TextSample):
            text = " ".join(s.text for s in samples if isinstance(s, TextSample))
            return next(tokenize_batches(self.tokenizer, [text], batch_size=1, max_length=sequence_length,
                                         padding="max_length", input_names=self.input_names))
        return next(self.feeds(samples[:1], batch_size=1))

    def _cast(self, sample: Sample, index: int) -> dict[str, np.ndarray]:
        if not isinstance(sample, dict):
            raise BadInputError("mixed text and array samples; use one kind of data file")
        out = {}
        for spec in self._inputs:
            if spec.name not in sample:
                raise BadInputError(f"{self.source}: input '{spec.name}' has no array in the data (sample {index} has: "
                                    f"{', '.join(sample)}); name the NPZ arrays after the model inputs")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
            out[spec.name] = np.asarray(sample[spec.name]).astype(dtype)
        return out

    def task_metric(self, outputs: Sequence[Mapping[str, np.ndarray]],
                    samples: Sequence[Sample]) -> dict[str, float]:
        if self.primary_output != "sentence_embedding":
            return {}
        return paraphrase_retrieval(outputs, samples, output=self.primary_output)
