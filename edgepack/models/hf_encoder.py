"""`hf-encoder`: a local Hugging Face encoder folder (BERT-like) exported as a sentence-embedding model.

The exported graph includes the pooling head (mean or CLS, then optional L2 normalisation) read from the
sentence-transformers files in the folder (`1_Pooling/config.json`, `modules.json`), so the ONNX file is a
complete deliverable: token ids in, `sentence_embedding` out. Task metric: paraphrase retrieval (recall@1 and
MRR of text -> its paraphrase among all evaluation paraphrases) when the data carries pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepack.calibration_data import Feed, Sample, TextSample, tokenize_batches
from edgepack.errors import BadInputError
from edgepack.models.base import ADAPTERS, ModelAdapter

POOLINGS = ("auto", "mean", "cls")


class SentenceEmbedder(torch.nn.Module):
    """Encoder + pooling + optional L2 normalisation, with positional inputs for export."""

    def __init__(self, encoder: torch.nn.Module, *, pooling: str, normalize: bool, input_names: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        hidden = self.encoder(**kwargs).last_hidden_state  # (B, T, C)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, C)
        else:
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, C)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return hidden, pooled


def check_model_folder(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"model folder {path} does not exist; pass a local Hugging Face model folder "
                            "(with config.json and model.safetensors)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BadInputError(f"{path} is not a Hugging Face model folder (no config.json); pass the folder that "
                            "`save_pretrained` wrote, or use adapter torch-module for a plain nn.Module")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise BadInputError(f"{path} has config.json but no weights (*.safetensors); save the model with "
                            "`save_pretrained(..., safe_serialization=True)`")


def _sentence_transformers_head(path: Path) -> tuple[str, bool]:
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


@ADAPTERS.register("hf-encoder")
class HFEncoderAdapter(ModelAdapter):
    kind = "hf-encoder"
    primary_output = "sentence_embedding"

    def __init__(self, source: str, *, pooling: str = "auto", normalize: bool | None = None) -> None:
        super().__init__(source)
        self.path = Path(source)
        check_model_folder(self.path)
        if pooling not in POOLINGS:
            raise BadInputError(f"model.pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
        auto_pooling, auto_normalize = _sentence_transformers_head(self.path)
        self.pooling = auto_pooling if pooling == "auto" else pooling
        self.normalize = auto_normalize if normalize is None else normalize
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise BadInputError(f"{self.path}: no usable tokenizer ({err.__class__.__name__}); "
                                    "save the tokenizer into the model folder with `tokenizer.save_pretrained`") from None
        return self._tokenizer

    @property
    def input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names)
        return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in names]

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state", "sentence_embedding"]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {name: {0: "batch", 1: "sequence"} for name in [*self.input_names, "last_hidden_state"]}
        axes["sentence_embedding"] = {0: "batch"}
        return axes

    def load_torch(self) -> torch.nn.Module:
        from transformers import AutoModel

        # Eager attention exports to plain MatMul/Softmax, which the INT8 recipes and mobile EPs understand.
        encoder = AutoModel.from_pretrained(self.path, local_files_only=True, attn_implementation="eager")
        return SentenceEmbedder(encoder, pooling=self.pooling, normalize=self.normalize,
                                input_names=self.input_names).eval()

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        return tokenize_batches(self.tokenizer, [_text(s) for s in samples], batch_size=batch_size,
                                max_length=max_length, padding=padding, input_names=self.input_names)

    def evaluation_feeds(self, samples: Sequence[Sample], *, max_length: int) -> list[Feed]:
        texts = [_text(s) for s in samples]
        pairs = [s.pair for s in samples if isinstance(s, TextSample) and s.pair]
        if len(pairs) == len(texts):  # paraphrase retrieval needs every pair
            texts += pairs
        return list(tokenize_batches(self.tokenizer, texts, batch_size=1, max_length=max_length,
                                     padding="longest", input_names=self.input_names))

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        """Batch 1, exactly `sequence_length` tokens of real text (evaluation sentences joined)."""
        text = " ".join(_text(s) for s in samples)
        feed = next(tokenize_batches(self.tokenizer, [text], batch_size=1, max_length=sequence_length,
                                     padding="max_length", input_names=self.input_names))
        return feed

    def task_metric(self, outputs: Sequence[Mapping[str, np.ndarray]],
                    samples: Sequence[Sample]) -> dict[str, float]:
        return paraphrase_retrieval(outputs, samples, output=self.primary_output)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pooling": self.pooling, "normalize": self.normalize}


def _text(sample: Sample) -> str:
    if not isinstance(sample, TextSample):
        raise BadInputError("adapter hf-encoder needs text samples, got arrays; point data.path at a .txt, .jsonl "
                            "or .csv file")
    return sample.text


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
