"""What the Hugging Face text families share: the model folder check, the tokenizer, text feeds.

The tokenizer is read from the model's folder, or from an edgepack artifact folder (export copies the tokenizer and
config files beside model.onnx, optimum-cli's convention), so a quantized or bundled model needs no `--tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgepack.calibration_data import Feed, Sample, TextSample, tokenize_batches
from edgepack.errors import BadInputError
from edgepack.families.base import ModelFamily, ModelSource

#: Files an HF folder keeps besides the weights that a deployed model needs (tokenizer, config, pooling head).
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                 "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "preprocessor_config.json",
                 "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json")
#: Encoder architectures (config model_type) the text families handle.
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "electra", "albert", "camembert",
                           "deberta", "deberta-v2", "ernie", "xlm", "modernbert", "nomic_bert", "mobilebert"})
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


#: weight files that are pickles: edgepack never loads them (a pickle runs code when it is read)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_folder(path: Path) -> None:
    """An HF folder must have its config and safetensors weights; a folder with only pickled weights is refused."""
    if list(path.glob("*.safetensors")) and (path / "config.json").is_file():
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    if pickled:
        raise BadInputError(f"refusing pickle checkpoint {pickled[0]}; convert it to safetensors "
                            "(load it once in a trusted session and `save_pretrained(..., safe_serialization=True)`)")
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path} is not a Hugging Face model folder (no config.json); pass the folder that "
                            "`save_pretrained` wrote, or an import path `pkg.module:factory` for a plain nn.Module")
    raise BadInputError(f"{path} has config.json but no *.safetensors weights; save the model with "
                        "`save_pretrained(..., safe_serialization=True)`")


def check_safetensors(path: Path) -> None:
    """The header of a .safetensors file parses (safetensors' own parser, header only): a truncated, foreign or
    pickled file is one line here instead of a SafetensorError deep in from_pretrained."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise BadInputError(f"{path}: not a readable safetensors file ({reason}); the file may be truncated or "
                            "something else renamed — save the model again with `save_pretrained`") from None


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise BadInputError(f"{folder}: no usable tokenizer ({err.__class__.__name__}); save the tokenizer into the "
                            "model folder with `tokenizer.save_pretrained`, or pass --tokenizer DIR") from None


def texts_of(samples: Sequence[Sample], *, family: str) -> list[str]:
    texts = []
    for sample in samples:
        if not isinstance(sample, TextSample):
            raise BadInputError(f"family {family} needs text samples, got arrays; point data.path at a .txt, .jsonl "
                                "or .csv file")
        texts.append(sample.text)
    return texts


class HFTextFamily(ModelFamily):
    """A tokenizer-fed HF model: from its HF folder (export, compress) or from an artifact folder (ONNX)."""

    def __init__(self, source: ModelSource, options: Any, *, task: str | None = None) -> None:
        super().__init__(source, options, task=task)
        if source.kind == "hf-folder":
            assert source.path is not None  # inspect_source sets it for folders
            check_model_folder(source.path)
        self._tokenizer: Any = None

    @property
    def folder(self) -> Path:
        folder = self.source.folder
        if folder is None:
            raise BadInputError(f"{self.source.text}: not a model folder")
        return folder

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.source.config or {})

    def vocab_size(self) -> int | None:
        """The config's vocab_size (the embedding rows), else the tokenizer's size with its added tokens."""
        size = self.config.get("vocab_size")
        return int(size) if size else len(self.tokenizer)

    def text_inputs(self) -> list[str]:
        names = list(self.tokenizer.model_input_names)
        return [n for n in TEXT_INPUTS if n in names]

    def artifact_files(self) -> list[tuple[Path, str]]:
        return [(self.folder / name, name) for name in CARRIED_FILES if (self.folder / name).is_file()]

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        return tokenize_batches(self.tokenizer, texts_of(samples, family=self.name), batch_size=batch_size,
                                max_length=max_length, padding=padding, input_names=self.io.input_names)

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        """Batch 1, exactly `sequence_length` tokens of real text (evaluation samples joined)."""
        text = " ".join(texts_of(samples, family=self.name))
        return next(tokenize_batches(self.tokenizer, [text], batch_size=1, max_length=sequence_length,
                                     padding="max_length", input_names=self.io.input_names))


def is_head_architecture(source: ModelSource, suffixes: Sequence[str]) -> bool:
    return any(a.endswith(tuple(suffixes)) for a in source.architectures)
