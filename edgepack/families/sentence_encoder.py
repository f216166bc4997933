"""`sentence-encoder`: a BERT-like Hugging Face encoder exported as a sentence-embedding model.

The exported graph includes the pooling head (mean or CLS, then optional L2 normalisation) read from the
sentence-transformers files in the folder (`1_Pooling/config.json`, `modules.json`), so the ONNX file is a
complete deliverable: token ids in, `sentence_embedding` out. Task metric: paraphrase retrieval (recall@1, MRR
and margin of text -> its paraphrase among all evaluation paraphrases) when the data carries pairs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgepack.calibration_data import Feed, Sample, TextSample, tokenize_batches
from edgepack.families.base import FamilyOptions, ModelIO, ModelSource, TensorSpec, register_family
from edgepack.families.hf_text import ENCODER_TYPES, HFTextFamily, is_head_architecture, texts_of

#: HF head classes that make a folder some other family's (a classifier, an LM), not a sentence encoder.
_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForCausalLM", "ForMaskedLM",
          "ForQuestionAnswering", "ForConditionalGeneration", "ForMultipleChoice", "ForPreTraining")


class SentenceEncoderOptions(FamilyOptions):
    #: auto: from the sentence-transformers files (mean for a bare HF folder)
    pooling: Literal["auto", "mean", "cls"] = "auto"
    #: L2-normalise the embedding; None: as the sentence-transformers files say
    normalize: bool | None = None


def pool(hidden: Any, mask: Any, *, pooling: str, normalize: bool) -> Any:
    """(B, T, C) -> (B, C): mean over real tokens or the first token; then L2 normalisation if the model has it.

    The one pooling implementation: the exported head and the distillation losses both call it."""
    import torch

    if pooling == "cls":
        pooled = hidden[:, 0]  # (B, C)
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


def sentence_transformers_head(path: Path) -> tuple[str, bool]:
    """(pooling, normalize) from sentence-transformers files; ("mean", False) for a bare HF folder."""
    pooling, normalize = "mean", False
    pooling_cfg = path / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        cfg = json.loads(pooling_cfg.read_text())
        pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    modules = path / "modules.json"
    if modules.is_file():
        normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    return pooling, normalize


def _embedder(encoder: Any, *, pooling: str, normalize: bool, input_names: list[str]) -> Any:
    import torch

    class SentenceEmbedder(torch.nn.Module):
        """Encoder + pooling + optional L2 normalisation, with positional inputs for export."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kwargs = dict(zip(input_names, inputs, strict=True))
            hidden = self.encoder(**kwargs).last_hidden_state  # (B, T, C)
            return hidden, pool(hidden, kwargs["attention_mask"], pooling=pooling, normalize=normalize)

    return SentenceEmbedder().eval()


@register_family
class SentenceEncoder(HFTextFamily):
    name = "sentence-encoder"
    tasks = ("feature-extraction",)
    weight_only_fidelity = "cosine"
    quant_recipe = "transformer-encoder"
    compress_task = "sentence-embedding"
    Options = SentenceEncoderOptions

    @classmethod
    def recognize(cls, source: ModelSource) -> int:
        if source.kind != "hf-folder" or is_head_architecture(source, _HEADS):
            return 0
        if source.path is not None and (source.path / "modules.json").is_file():
            return 20  # a sentence-transformers folder
        return 10 if source.model_type in ENCODER_TYPES else 0

    def __init__(self, source: ModelSource, options: SentenceEncoderOptions, *, task: str | None = None) -> None:
        super().__init__(source, options, task=task)
        auto_pooling, auto_normalize = sentence_transformers_head(self.folder)
        resolved = {"pooling": auto_pooling if options.pooling == "auto" else options.pooling,
                    "normalize": auto_normalize if options.normalize is None else options.normalize}
        self.options = SentenceEncoderOptions(**resolved)  # the artifact records what was exported
        self.pooling: str = resolved["pooling"]
        self.normalize: bool = resolved["normalize"]

    @property
    def io(self) -> ModelIO:
        inputs = tuple(TensorSpec(n, ("batch", "sequence"), "int64") for n in self.text_inputs())
        outputs = (TensorSpec("last_hidden_state", ("batch", "sequence")), TensorSpec("sentence_embedding", ("batch",)))
        return ModelIO(inputs, outputs, primary_output="sentence_embedding")

    def load_torch(self) -> Any:
        if self.source.kind != "hf-folder":
            return super().load_torch()
        from transformers import AutoModel

        # Eager attention exports to plain MatMul/Softmax, which the INT8 recipes and mobile EPs understand.
        encoder = AutoModel.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                            attn_implementation="eager")
        return _embedder(encoder, pooling=self.pooling, normalize=self.normalize, input_names=self.io.input_names)

    def evaluation_feeds(self, samples: Sequence[Sample], *, max_length: int) -> list[Feed]:
        texts = texts_of(samples, family=self.name)
        pairs = [s.pair for s in samples if isinstance(s, TextSample) and s.pair]
        if len(pairs) == len(texts):  # paraphrase retrieval needs every pair
            texts += pairs
        return list(tokenize_batches(self.tokenizer, texts, batch_size=1, max_length=max_length,
                                     padding="longest", input_names=self.io.input_names))

    def task_metrics(self, outputs: Sequence[Mapping[str, np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        return paraphrase_retrieval(outputs, samples, output=self.primary_output)


def paraphrase_retrieval(outputs: Sequence[Mapping[str, np.ndarray]], samples: Sequence[Sample], *,
                         output: str) -> dict[str, float]:
    """Recall@1, MRR and margin of each text's paraphrase among all evaluation paraphrases.

    `outputs` holds the N texts' outputs then the N paraphrases' (see `evaluation_feeds`); {} when no pairs.
    Recall@1 saturates on easy data (a strong encoder scores 1.0), so `paraphrase_margin` is reported too: the
    mean of cos(text, its paraphrase) - max cos(text, any other paraphrase), which moves continuously.
    """
    n = len(samples)
    if n == 0 or len(outputs) != 2 * n:
        return {}
    emb = np.concatenate([o[output] for o in outputs]).astype(np.float64)  # (2N, C)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    sims = emb[:n] @ emb[n:].T  # (N, N): text i vs paraphrase j
    positive = np.diag(sims)
    ranks = (sims > positive[:, None]).sum(axis=1)  # 0 = the true paraphrase is the nearest
    negatives = np.where(np.eye(n, dtype=bool), -np.inf, sims).max(axis=1) if n > 1 else np.zeros(n)
    return {"paraphrase_recall_at_1": float(np.mean(ranks == 0)), "paraphrase_mrr": float(np.mean(1.0 / (ranks + 1))),
            "paraphrase_margin": float(np.mean(positive - negatives))}
