"""`onnx`: a user's ONNX file from any toolchain, with no framework behind it (quantize, validate, bundle).

Inputs and outputs come from the graph. Array data (NPZ, arrays named after the inputs) is cast to each input's
ONNX dtype; text data needs a tokenizer folder (`model.tokenizer` / `--tokenizer`), found beside the model when
it was written there. Fidelity is measured on `sentence_embedding` when the graph has it, else on its first output.
An ONNX file that edgepack itself exported reopens as the family that wrote it, not as this one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.calibration_data import Feed, Sample, TextSample, array_batches, tokenize_batches
from edgepack.errors import BadInputError
from edgepack.families.base import FamilyOptions, ModelFamily, ModelIO, ModelSource, TensorSpec, register_family
from edgepack.families.hf_text import CARRIED_FILES, load_tokenizer
from edgepack.families.sentence_encoder import paraphrase_retrieval


class OnnxOptions(FamilyOptions):
    #: HF folder whose tokenizer turns text data into the model's inputs (default: the model's own folder)
    tokenizer: str | None = None


def graph_io(path: Path) -> ModelIO:
    """Inputs (initializers excluded) and outputs of an ONNX file, symbolic dims kept as names."""
    import onnx

    from edgepack.onnx_files import load_onnx_checked

    model = load_onnx_checked(path)
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "float32"
        return TensorSpec(value.name, dims, dtype)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in model.graph.output)
    if not outputs:
        raise BadInputError(f"{path}: the graph has no outputs; export it with its outputs named")
    names = [o.name for o in outputs]
    return ModelIO(inputs, outputs, primary_output="sentence_embedding" if "sentence_embedding" in names else names[0])


def graph_signature(path: Path) -> dict[str, Any]:
    """{"inputs": {name: {"dims", "dtype"}}, "outputs": {...}} of an ONNX file: what makes two models the same
    model to `edgepack compare` (an INT8 and its FP32 share it)."""
    io = graph_io(path)
    return {kind: {t.name: {"dims": list(t.dims), "dtype": t.dtype} for t in specs}
            for kind, specs in (("inputs", io.inputs), ("outputs", io.outputs))}


@register_family
class OnnxModel(ModelFamily):
    name = "onnx"
    tasks = ("any",)
    weight_only_fidelity = "cosine"  # a graph with MatMul weights; find_targets refuses one without
    quant_recipe = "auto"
    Options = OnnxOptions

    @classmethod
    def recognize(cls, source: ModelSource) -> int:
        return 1 if source.kind == "onnx" else 0

    def __init__(self, source: ModelSource, options: OnnxOptions, *, task: str | None = None) -> None:
        super().__init__(source, options, task=task)
        assert source.path is not None  # inspect_source sets it for files
        self._io = graph_io(source.path)
        self._tokenizer: Any = None

    @property
    def io(self) -> ModelIO:
        return self._io

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            folder = Path(self.options.tokenizer) if self.options.tokenizer else self.source.folder
            if folder is None or not (self.options.tokenizer or (folder / "tokenizer_config.json").is_file()):
                raise BadInputError("text data needs a tokenizer: pass --tokenizer DIR (the model's Hugging Face "
                                    "folder), or give arrays in an .npz named after the model inputs")
            self._tokenizer = load_tokenizer(folder)
        return self._tokenizer

    def vocab_size(self) -> int | None:
        """The carried or named tokenizer's size; None without one (generated ids then follow the graph's
        embedding table, `families/generated.py`)."""
        folder = Path(self.options.tokenizer) if self.options.tokenizer else self.source.folder
        if folder is None or not (folder / "tokenizer_config.json").is_file():
            return None
        return len(self.tokenizer)

    def artifact_files(self) -> list[tuple[Path, str]]:
        """The tokenizer's files, when one was named: a model written from this one then carries them."""
        if not self.options.tokenizer:
            return []
        folder = Path(self.options.tokenizer)
        return [(folder / name, name) for name in CARRIED_FILES if (folder / name).is_file()]

    def artifact_record(self) -> dict[str, Any]:
        record = super().artifact_record()
        record["options"] = {**record["options"], "tokenizer": None}  # it travels with the model now
        return record

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        if samples and isinstance(samples[0], TextSample):
            return tokenize_batches(self.tokenizer, [s.text for s in samples if isinstance(s, TextSample)],
                                    batch_size=batch_size, max_length=max_length, padding=padding,
                                    input_names=self.io.input_names)
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
                                         padding="max_length", input_names=self.io.input_names))
        return next(self.feeds(samples[:1], batch_size=1))

    def _cast(self, sample: Sample, index: int) -> dict[str, np.ndarray]:
        if not isinstance(sample, dict):
            raise BadInputError("mixed text and array samples; use one kind of data file")
        out = {}
        for spec in self.io.inputs:
            if spec.name not in sample:
                raise BadInputError(f"{self.source.text}: input '{spec.name}' has no array in the data (sample {index} "
                                    f"has: {', '.join(sample)}); name the NPZ arrays after the model inputs")
            out[spec.name] = np.asarray(sample[spec.name]).astype(spec.dtype)
        return out

    def task_metrics(self, outputs: Sequence[Mapping[str, np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        if self.primary_output != "sentence_embedding":
            return {}
        return paraphrase_retrieval(outputs, samples, output=self.primary_output)
