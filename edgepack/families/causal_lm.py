"""`causal-lm`: a Llama-style decoder (HF `*ForCausalLM` folder or a GGUF file) with a KV cache, for devices.

Export writes one graph for prefill and decode (`edgepack.exporters.decoder`), checks it against PyTorch on real
text (logits and next-token agreement, on a prefill and on a token-by-token decode through the cache), and writes
`genai_config.json` beside it, so onnxruntime-genai runs the folder as it is. Quantization is weight-only
(`edgepack.quantization.weight_only`: MatMulNBits INT4 / INT8). Evaluation runs in fresh ONNX Runtime processes
(`edgepack.runtime.decoding` as probe tasks): perplexity and teacher-forced next-token agreement on held-out text,
greedy generation agreement, time to first token, prefill and decode tokens/s, and peak RSS with the cache filled to
each planning context, from which the report's memory plan (`MemoryPlan`) says how long a context fits a budget.

Tokens: the evaluation texts joined by blank lines, tokenized once without special tokens, cut into windows of
`evaluation.perplexity_window` tokens (each window starts with an empty cache). Prompts: the first
`evaluation.prompt_tokens` tokens of the first `evaluation.prompts` evaluation texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgepack.calibration_data import Feed, Sample
from edgepack.errors import BadInputError
from edgepack.exporters.decoder import GRAPH_LAYOUT, LLAMA_LIKE, DecoderConfig
from edgepack.families.base import FamilyOptions, ModelIO, ModelSource, TensorSpec, inspect_source, register_family
from edgepack.families.hf_text import CARRIED_FILES, HFTextFamily, check_model_folder, texts_of

#: what travels beside model.onnx besides the tokenizer: GenAI's config and, for GGUF sources, where weights came from
LLM_FILES = (*CARRIED_FILES, "chat_template.jinja", "genai_config.json", "provenance.json")


class CausalLMEvaluation(BaseModel):
    """How a causal LM is measured (`model.evaluation` in a recipe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: tokens per teacher-forced window (perplexity, next-token agreement)
    perplexity_window: int = Field(512, ge=16)
    #: greedy generation: this many prompts of `prompt_tokens` tokens, `new_tokens` generated each
    prompts: int = Field(16, ge=1)
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(32, ge=1)
    #: contexts (tokens) at which peak RSS is measured, each in a fresh process, the cache filled in prefill chunks
    contexts: list[int] = Field(default_factory=lambda: [256, 1024, 2048])
    prefill_chunk: int = Field(256, ge=1)
    #: memory budgets (MiB) for which the report gives the longest context that fits
    budgets_mb: list[int] = Field(default_factory=lambda: [256, 512, 1024])

    @field_validator("contexts")
    @classmethod
    def _contexts(cls, value: list[int]) -> list[int]:
        if not value or any(c < 2 for c in value):
            raise ValueError("give at least one context of 2 tokens or more")
        return sorted(set(value))


class CausalLMOptions(FamilyOptions):
    evaluation: CausalLMEvaluation = Field(default_factory=CausalLMEvaluation)


def _is_gguf(source: ModelSource) -> bool:
    return source.kind == "file" and source.path is not None and source.path.suffix.lower() == ".gguf"


def _wrap_torch(model: Any, layers: int) -> Any:
    """Flat positional inputs (input_ids, attention_mask, position_ids, past k/v ...) -> (logits, presents ...)."""
    import torch
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache()
            if past[0].shape[2] > 0:
                for i in range(layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            presents = []
            for i in range(layers):
                layer = out.past_key_values.layers[i]
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return Decoder().eval()


@register_family
class CausalLM(HFTextFamily):
    name = "causal-lm"
    tasks = ("text-generation",)
    weight_only_fidelity = "perplexity"
    quant_recipe = "weight-only"
    compress_task = "causal-lm"
    Options = CausalLMOptions

    def __init__(self, source: ModelSource, options: Any, *, task: str | None = None) -> None:
        self.gguf: Path | None = None
        if _is_gguf(source):
            from edgepack.families.gguf import hf_folder_from_gguf

            assert source.path is not None
            self.gguf = source.path
            source = inspect_source(str(hf_folder_from_gguf(source.path)))
        if source.kind == "hf-folder":
            check_model_folder(source.path)  # type: ignore[arg-type]
            _check_head(source)
        super().__init__(source, options, task=task)
        self.decoder = DecoderConfig.from_config(self.config, where=source.text)

    @classmethod
    def recognize(cls, source: ModelSource) -> int:
        if _is_gguf(source):
            return 20
        if source.kind != "hf-folder":
            return 0
        if any(a.endswith("ForCausalLM") for a in source.architectures):
            return 20
        return 10 if source.model_type in LLAMA_LIKE else 0  # a decoder without its head: say so (in __init__)

    # ------------------------------------------------------------------------------------------------ export

    @property
    def io(self) -> ModelIO:
        cfg = self.decoder
        past, present = [], []
        for i in range(cfg.layers):
            for kind in ("key", "value"):
                past.append(TensorSpec(f"past_key_values.{i}.{kind}", ("batch", cfg.kv_heads, "past", cfg.head_dim)))
                present.append(TensorSpec(f"present.{i}.{kind}", ("batch", cfg.kv_heads, "total", cfg.head_dim),
                                          atol=1e-3, min_cosine=0.9999))
        inputs = (TensorSpec("input_ids", ("batch", "sequence"), "int64"),
                  TensorSpec("attention_mask", ("batch", "total"), "int64"),
                  TensorSpec("position_ids", ("batch", "sequence"), "int64"), *past)
        return ModelIO(inputs, (TensorSpec("logits", ("batch", "sequence", cfg.vocab), atol=1e-2), *present),
                       primary_output="logits")

    def load_torch(self) -> Any:
        if self.source.kind != "hf-folder":
            return super().load_torch()
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                                     attn_implementation="eager", dtype="float32")
        return _wrap_torch(model, self.decoder.layers)

    def export(self, out_path: Path, *, check_feeds: Sequence[Feed], options: Any) -> dict[str, Any]:
        """The decoder graph, checked against PyTorch; genai_config.json beside it."""
        from edgepack.exporters.decoder import build_decoder, genai_config
        from edgepack.families.causal_lm_eval import check_decoder

        if self.source.kind != "hf-folder":
            return super().export(out_path, check_feeds=check_feeds, options=options)
        eos, bos, pad = self.special_ids()
        built = build_decoder(self.folder, out_path)
        check = check_decoder(self, out_path, feeds=check_feeds, atol=options.atol)
        config = genai_config(self.decoder, eos=eos, bos=bos, pad=pad, filename=out_path.name)
        (out_path.parent / "genai_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return {"opset": 17, "graph": built, "check": check,
                "parameters": _parameter_count(self.decoder), "gguf": str(self.gguf) if self.gguf else None}

    def special_ids(self) -> tuple[int | list[int], int | None, int]:
        """(eos, bos, pad) token ids from the tokenizer and generation config; no EOS is a BadInputError."""
        generation = self.folder / "generation_config.json"
        gen = json.loads(generation.read_text()) if generation.is_file() else {}
        eos = gen.get("eos_token_id", self.config.get("eos_token_id"))
        if eos is None and self._named_eos() is not None:
            eos = self.tokenizer.convert_tokens_to_ids(self._named_eos())
        if eos is None or eos == []:
            raise BadInputError(f"{self.source.text}: the tokenizer and config name no EOS token (eos_token_id), so "
                                "generation could never stop; set eos_token_id in generation_config.json or the "
                                "tokenizer's eos_token")
        bos = gen.get("bos_token_id", self.config.get("bos_token_id", self.tokenizer.bos_token_id))
        pad = gen.get("pad_token_id", self.config.get("pad_token_id"))
        first_eos = eos[0] if isinstance(eos, list) else eos
        return eos, bos, int(pad if pad is not None else first_eos)

    def _named_eos(self) -> str | None:
        """The EOS token the tokenizer files name (not a tokenizer class's default, e.g. GPT2's <|endoftext|>)."""
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = self.folder / name
            token = json.loads(path.read_text()).get("eos_token") if path.is_file() else None
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return str(token)
        return None

    def artifact_files(self) -> list[tuple[Path, str]]:
        return [(self.folder / name, name) for name in LLM_FILES if (self.folder / name).is_file()]

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "graph_layout": GRAPH_LAYOUT}
        if self.gguf is not None:
            described["gguf"] = str(self.gguf)
        return described

    def report_notes(self) -> list[str]:
        provenance = self.folder / "provenance.json"
        if not provenance.is_file():
            return []
        return [f"{json.loads(provenance.read_text())['note']} (source {self.gguf or self.folder})"]

    # -------------------------------------------------------------------------------------------------- data

    def token_ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def stream(self, samples: Sequence[Sample], *, at_least: int = 0) -> np.ndarray:
        """The samples' texts joined by blank lines as one token stream, repeated up to `at_least` tokens."""
        ids = self.token_ids("\n\n".join(texts_of(samples, family=self.name)))
        if len(ids) == 0:
            raise BadInputError("the evaluation texts tokenize to nothing; give the causal LM some text")
        return np.resize(ids, max(len(ids), at_least))

    def prefill_feed(self, ids: np.ndarray, *, cache_dtype: Any = np.float32) -> Feed:
        """Batch 1, positions 0..T-1, an empty cache (of the graph's cache type: float32, or int8)."""
        cfg = self.decoder
        self.check_context(len(ids), what="a prefill")
        feed: Feed = {"input_ids": ids.reshape(1, -1).astype(np.int64),
                      "attention_mask": np.ones((1, len(ids)), np.int64),
                      "position_ids": np.arange(len(ids), dtype=np.int64).reshape(1, -1)}
        for i in range(cfg.layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.kv_heads, 0, cfg.head_dim), cache_dtype)
        return feed

    def feed_for(self, feed: Feed, model: Path) -> Feed:
        """`feed` with the empty cache `model` takes: its layers, KV heads and cache type (an INT8-KV variant takes
        int8 past tensors; the teacher validated beside a distilled student has more layers)."""
        from edgepack.families.causal_lm_eval import cache_geometry

        cache = cache_geometry(model, kv_heads=self.decoder.kv_heads, head_dim=self.decoder.head_dim)
        return {**{k: v for k, v in feed.items() if not k.startswith("past_key_values.")}, **cache.empty()}

    def check_context(self, tokens: int, *, what: str) -> None:
        limit = self.decoder.max_positions
        if tokens > limit:
            raise BadInputError(f"{what} of {tokens} tokens is longer than the model's position embeddings "
                                f"(max_position_embeddings {limit}); use at most {limit} tokens")

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        """One prefill feed per text (batch 1, empty cache), truncated to `max_length` tokens."""
        for text in texts_of(samples, family=self.name):
            ids = self.token_ids(text)[:max_length]
            if len(ids):
                yield self.prefill_feed(ids)

    def evaluation_feeds(self, samples: Sequence[Sample], *, max_length: int) -> list[Feed]:
        return []  # scored by the probe tasks (generation needs a loop, not one run per feed)

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        """A prefill of exactly `sequence_length` tokens of the evaluation text."""
        return self.prefill_feed(self.stream(samples, at_least=sequence_length)[:sequence_length])

    # ---------------------------------------------------------------------------------------------- scoring

    def probe_tasks(self, samples: Sequence[Sample], *, settings: Any) -> list[Any]:
        from edgepack.families.causal_lm_eval import probe_tasks

        return probe_tasks(self, samples, settings=settings)

    def task_report(self, results: Mapping[str, Any], reference: Mapping[str, Any] | None, *,
                    model: Path) -> dict[str, Any]:
        from edgepack.families.causal_lm_eval import task_report

        return task_report(self, results, reference, model=model)


def _check_head(source: ModelSource) -> None:
    architectures = source.architectures
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise BadInputError(f"{source.text}: {source.describe()} has no causal-LM head (lm_head): family causal-lm "
                            "needs a *ForCausalLM checkpoint; save the model with AutoModelForCausalLM")
    if source.model_type not in LLAMA_LIKE:
        raise BadInputError(f"{source.text}: {source.describe()} is a causal LM, but family causal-lm exports "
                            f"Llama-style decoders only (model_type {', '.join(sorted(LLAMA_LIKE))})")


def _parameter_count(cfg: DecoderConfig) -> int:
    per_layer = (cfg.hidden * (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.heads * cfg.head_dim * cfg.hidden
                 + 3 * cfg.hidden * cfg.intermediate + 2 * cfg.hidden)
    head = 0 if cfg.tied else cfg.vocab * cfg.hidden
    return cfg.vocab * cfg.hidden + cfg.layers * per_layer + cfg.hidden + head
