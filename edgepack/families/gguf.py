"""A GGUF checkpoint (llama.cpp's format) -> an ordinary Hugging Face folder, cached outside the run folder.

The `gguf` package parses the file (no pickle anywhere); transformers (`from_pretrained(..., gguf_file=...)`) maps
the tensor names, undoes llama.cpp's Q/K row permutation and dequantizes to float32; `save_pretrained` writes the
folder. The tokenizer is ours: transformers 4.57 turns a GGUF byte-level BPE vocabulary ("gpt2" model) into a
`LlamaTokenizer` with a SentencePiece decoder, a BOS it should not add and the BOS as EOS, which decodes wrongly in
onnxruntime-genai. We rebuild it from the GGUF vocabulary, merges, special ids and pre-tokenizer name with the
`tokenizers` library, as the model's original tokenizer.json has it.

Dequantized weights are not the original float weights: a Q4_1 tensor is blocks of 32 values `d * q + m` (q in
0..15, per-block scale and min), Q8_0 blocks of 32 `d * q` (q in -127..127). An INT4 scheme whose blocks align with
those (32 along the input axis, asymmetric) can reproduce them exactly and look lossless: `provenance.json` in the
folder records the source types, and the causal-lm family reports them beside every quantized figure.

>>> folder = hf_folder_from_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from edgepack.artifacts import sha256_file
from edgepack.errors import BadInputError

#: GGUF tokenizer.ggml.pre -> (split digits one by one, byte-level regex) of the model's original tokenizer.json
_BYTE_LEVEL_PRE = {"smollm": True, "gpt2": False, "default": False, "starcoder": True, "refact": True}
#: GGUF token types (llama.cpp's enum): 3 control, 4 user-defined
_SPECIAL_TYPES = (3, 4)


def cache_root() -> Path:
    """Where derived model folders live: $EDGEPACK_CACHE, else ~/.cache/edgepack (never inside a git checkout)."""
    return Path(os.environ.get("EDGEPACK_CACHE") or Path.home() / ".cache" / "edgepack")


def _need(module: str, package: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInputError(f"{what} needs the Python package '{package}', which is not installed; run "
                            f"`pip install {package}` (or `pip install 'edgepack[llm]'`)") from None


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file, plus `_tensor_types` (type name -> tensor count)."""
    gguf = _need("gguf", "gguf==0.19.0", f"reading {path.name}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # a truncated or foreign file: gguf raises ValueError / struct errors
        raise BadInputError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error}); pass a .gguf "
                            "checkpoint written by llama.cpp") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            meta[key] = field.contents()
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: S112 (exotic array fields are not needed)
            continue
    meta["_tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    meta["_tensor_type_of"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


def build_tokenizer(meta: dict[str, Any], *, where: str) -> Any:
    """A transformers fast tokenizer from the GGUF vocabulary (byte-level BPE, "gpt2" tokenizer model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = meta.get("tokenizer.ggml.model"), str(meta.get("tokenizer.ggml.pre", "default"))
    if kind != "gpt2" or pre not in _BYTE_LEVEL_PRE:
        raise BadInputError(f"{where}: GGUF tokenizer model '{kind}' with pre-tokenizer '{pre}' is not rebuilt by "
                            f"edgepack (it rebuilds byte-level BPE with pre-tokenizers {', '.join(_BYTE_LEVEL_PRE)}); "
                            "convert the checkpoint to a Hugging Face folder with its original tokenizer")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if _BYTE_LEVEL_PRE[pre] else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tokenizer.add_special_tokens([t for t, kind_id in zip(tokens, types, strict=False) if kind_id in _SPECIAL_TYPES])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    if token("eos") is None:
        raise BadInputError(f"{where}: the GGUF tokenizer names no EOS token (tokenizer.ggml.eos_token_id); "
                            "generation could never stop: use a checkpoint whose tokenizer has one")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=token("bos"), eos_token=token("eos"),
                                   unk_token=token("unknown"), pad_token=token("padding") or token("eos"),
                                   chat_template=meta.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False)


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # GPT2Tokenizer: what the original byte-level tokenizers declare, so onnxruntime-genai decodes bytes.
    config.update(tokenizer_class="GPT2Tokenizer", add_bos_token=False, add_prefix_space=False)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _convert(path: Path, out: Path, meta: dict[str, Any]) -> None:
    _need("accelerate", "accelerate==1.15.0", f"loading {path.name}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer(meta, where=str(path))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    _save_tokenizer(tokenizer, out)


def hf_folder_from_gguf(path: Path) -> Path:
    """The cached HF folder converted from GGUF file `path` (converted on first use; keyed by the file's sha256)."""
    if not path.is_file():
        raise BadInputError(f"GGUF file {path} does not exist")
    sha = sha256_file(path)
    out = cache_root() / f"{path.stem.lower()}-{sha[:12]}"
    if (out / "provenance.json").is_file():
        return out
    meta = read_gguf_metadata(path)
    if meta.get("general.architecture") not in ("llama", "mistral", "qwen2"):
        raise BadInputError(f"{path}: GGUF architecture '{meta.get('general.architecture')}' is not a Llama-style "
                            "decoder; family causal-lm reads llama, mistral and qwen2 GGUF files")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert(path, tmp, meta)
        provenance = {"source": str(path), "sha256": sha, "tensor_types": meta["_tensor_types"],
                      "tensor_type_of": meta["_tensor_type_of"], "note": weights_note(meta["_tensor_types"])}
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_BLOCK_NOTES = {"Q4_0": "Q4_0 (blocks of 32, scale only)", "Q4_1": "Q4_1 (blocks of 32 with scale and min)",
                "Q8_0": "Q8_0 (blocks of 32, symmetric scale)", "Q5_0": "Q5_0 (blocks of 32)",
                "Q5_1": "Q5_1 (blocks of 32 with min)", "Q4_K": "Q4_K (super-blocks of 256)",
                "Q6_K": "Q6_K (super-blocks of 256)"}


def weights_note(tensor_types: dict[str, int]) -> str:
    """'FP32 weights dequantized from GGUF Q4_1 (...) x210, Q8_0 (...) x1': said next to every quantized figure."""
    quantized = {k: v for k, v in tensor_types.items() if k not in ("F32", "F16", "BF16")}
    if not quantized:
        return "GGUF weights stored in float: no prior quantization"
    parts = ", ".join(f"{_BLOCK_NOTES.get(k, k)} x{v}" for k, v in sorted(quantized.items(), key=lambda kv: -kv[1]))
    return (f"FP32 weights dequantized from GGUF {parts}: an INT4 scheme aligned with those blocks (32 along the "
            "input axis, asymmetric) can reproduce them and look lossless")
