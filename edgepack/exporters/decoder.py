"""Llama-style decoder -> one ONNX graph with a KV cache (prefill and decode), built from the weights as data.

Why our own builder rather than `torch.onnx.export` or onnxruntime-genai's model builder: the TorchScript exporter
traces transformers' cache objects and mask helpers into hundreds of small ops per layer (optimum-onnx patches them
for that), and the GenAI builder (0.18) needs transformers 5, which edgepack's pin excludes. The Llama block is
small and fixed, so we write it with ONNX Runtime's fused decoder ops, the ones the GenAI builder uses on the CPU:

    input_ids (B, S) ─ Gather(embed) ─► x (B, S, H)
    per layer:  SkipSimplifiedLayerNormalization (RMSNorm with the residual add)
                MatMul qkv (H, (Hq + 2 Hkv) D) [+ bias]  ─►  GroupQueryAttention (packed q|k|v, RoPE inside at
                position_ids, past / present KV, causal, grouped KV heads)  ─►  MatMul o_proj
                SkipSimplifiedLayerNormalization  ─►  MatMul gate, MatMul up ─ SiLU(gate) * up ─ MatMul down
    final RMSNorm ─► logits (B, S, V) = MatMul(x, lm_head)   (tied: the embedding table, transposed)

Per decode step every node costs a kernel dispatch, so the layer has as few as the GenAI builder's CPU graph (9):
GroupQueryAttention takes the packed projection and applies the rotary itself (`do_rotary`, the cos / sin tables and
`position_ids` as inputs) instead of a Split and two RotaryEmbedding nodes, and gate / up are two MatMuls rather than
one packed MatMul and a Split (measured on SmolLM2 INT4, 2 threads, M = 1: MatMulNBits 576 x 3072 takes 72 us, two
576 x 1536 take 65 us, the Split another 9). GroupQueryAttention's rotary honours `position_ids` in decode steps and
in later prompt chunks; within the *first* call on an empty cache it places the tokens at consecutive positions from
the first element of `position_ids` (ONNX Runtime's schema: "uses only the first element"), which is what a batch-1,
right-padded prompt has anyway.

Names are the ones ONNX Runtime GenAI and optimum use: inputs `input_ids`, `attention_mask` (B, past + S),
`position_ids` (B, S), `past_key_values.<i>.key|value` (B, Hkv, past, D); outputs `logits`, `present.<i>.key|value`
(B, Hkv, past + S, D). Prefill is a call with an empty past (past = 0); decode feeds one token and the presents.
GroupQueryAttention reads each row's length from the attention mask (its sum), so a batch must be right-padded
(every row's real tokens first); edgepack evaluates at batch 1.

Weights are read from the HF folder's safetensors as numpy (no torch, no pickle); HF Linear weights (out, in) become
MatMul weights (in, out). The rotary tables come from transformers' own RoPE initialisers (default, linear, llama3,
yarn, longrope's short factor...), so scaled RoPE matches PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import BadInputError
from edgepack.onnx_files import save_onnx

#: model_type values whose checkpoints have the Llama block (RMSNorm, RoPE, GQA, SwiGLU)
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2"})
MS = "com.microsoft"
OPSET = 17
#: the graph layout's version, part of the export stage's key: a changed layout is not served from an old cache
#: (2: packed q|k|v into GroupQueryAttention with its rotary at position_ids, separate gate / up MatMuls)
GRAPH_LAYOUT = 2


@dataclass(frozen=True)
class DecoderConfig:
    """What the graph needs from config.json. `kv_bytes_per_token` is the planning figure."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rms_eps: float
    tied: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, where: str) -> DecoderConfig:
        model_type = str(config.get("model_type"))
        if model_type not in LLAMA_LIKE:
            raise BadInputError(f"{where}: model_type '{model_type}' is not a Llama-style decoder; family causal-lm "
                                f"exports {', '.join(sorted(LLAMA_LIKE))}")
        if config.get("hidden_act", "silu") != "silu":
            raise BadInputError(f"{where}: hidden_act '{config.get('hidden_act')}' is not silu; the decoder graph "
                                "has SwiGLU MLPs only")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        sliding = config.get("sliding_window") if config.get("use_sliding_window", model_type == "mistral") else None
        if sliding and int(sliding) < int(config.get("max_position_embeddings", 0)):
            raise BadInputError(f"{where}: sliding_window {sliding} is shorter than max_position_embeddings "
                                f"{config.get('max_position_embeddings')}; windowed attention is not exported")
        return cls(
            model_type=model_type, layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]), max_positions=int(config.get("max_position_embeddings", 2048)),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)), tied=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(config.get("mlp_bias", False)))

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """layers x kv_heads x head_dim x 2 (key and value) x bytes per element."""
        return self.layers * self.kv_heads * self.head_dim * 2 * dtype_bytes


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------- weights


class Weights:
    """The folder's safetensors tensors as float32 numpy arrays, by HF name (read lazily, once)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._files = {}
        for path in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(path), framework="np")
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self._files[name] = handle
        if not self._files:
            raise BadInputError(f"{folder}: no *.safetensors weights; save the model with `save_pretrained`")

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise BadInputError(f"checkpoint has no tensor '{name}' (a Llama-style decoder needs it); re-save the "
                                "model with `save_pretrained` from its *ForCausalLM class")
        return np.ascontiguousarray(self._files[name].get_tensor(name), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- rotary


def rotary_tables(config: Mapping[str, Any], cfg: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches (max_positions, rotary_dim / 2), float32, from transformers' RoPE initialisers."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
    scaling = getattr(hf, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "dynamic":
        raise BadInputError("rope_scaling type 'dynamic' changes with the sequence length; the exported graph "
                            "needs fixed rotary tables: use a model with default, linear, llama3 or yarn RoPE")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    positions = torch.arange(cfg.max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())  # (P, D/2)
    return ((freqs.cos() * scale).numpy().astype(np.float32), (freqs.sin() * scale).numpy().astype(np.float32))


# ---------------------------------------------------------------------------------------------------- graph


class _Graph:
    """Nodes, initializers and value infos, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, *, domain: str = "",
             **attrs: Any) -> list[str]:
        names = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names


def _linear(g: _Graph, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
    """MatMul with a constant (in, out) weight, then the bias as an Add (what MatMulNBits quantizers look for)."""
    (y,) = g.node("MatMul", [x, g.const(f"{name}.weight", weight)], 1, f"{name}/MatMul")
    if bias is not None:
        (y,) = g.node("Add", [y, g.const(f"{name}.bias", bias)], 1, f"{name}/Add")
    return y


def _rms_norm(g: _Graph, x: str, weight: str, name: str, eps: float) -> str:
    """RMSNorm in standard ops (Pow, ReduceMean, Add, Sqrt, Div, Mul), which ONNX Runtime fuses into its
    SimplifiedLayerNormalization; that op itself sits in the ONNX domain without an ONNX schema, so onnx's checker
    (which every edgepack stage runs on a model it opens) would reject the file."""
    (sq,) = g.node("Pow", [x, g.const(f"{name}/two", np.array(2.0, np.float32))], 1, f"{name}/Pow")
    (mean,) = g.node("ReduceMean", [sq], 1, f"{name}/ReduceMean", axes=[-1], keepdims=1)
    (var,) = g.node("Add", [mean, g.const(f"{name}/eps", np.array(eps, np.float32))], 1, f"{name}/Add")
    (rms,) = g.node("Sqrt", [var], 1, f"{name}/Sqrt")
    (y,) = g.node("Div", [x, rms], 1, f"{name}/Div")
    (out,) = g.node("Mul", [y, weight], 1, f"{name}/Mul")
    return out


def _skip_norm(g: _Graph, x: str, residual: str, weight: str, name: str, eps: float) -> tuple[str, str]:
    """SkipSimplifiedLayerNormalization: (RMSNorm(x + residual), x + residual). Its mean and inv_std_var outputs
    stay unnamed: ONNX Runtime then skips writing them (measured: 16 -> 9 us per node at decode)."""
    out, _, _, added = g.node("SkipSimplifiedLayerNormalization", [x, residual, weight],
                              [f"{name}/output_0", "", "", f"{name}/output_3"], name, domain=MS, epsilon=eps)
    return out, added


def _layer(g: _Graph, w: Weights, cfg: DecoderConfig, i: int, hidden: str, residual: str | None,
           shared: Mapping[str, str]) -> tuple[str, str]:
    """One decoder layer; returns (its output before the next residual add, the residual stream)."""
    p, base = f"model.layers.{i}", f"/model/layers.{i}"
    norm_w = g.const(f"{p}.input_layernorm.weight", w.get(f"{p}.input_layernorm.weight"))
    if residual is None:  # layer 0: plain RMSNorm of the embeddings, which are the residual stream
        normed = _rms_norm(g, hidden, norm_w, f"{base}/input_layernorm", cfg.rms_eps)
        residual = hidden
    else:
        normed, residual = _skip_norm(g, hidden, residual, norm_w, f"{base}/input_layernorm", cfg.rms_eps)
    a = f"{p}.self_attn"
    qkv_w = np.concatenate([w.get(f"{a}.{n}_proj.weight").T for n in "qkv"], axis=1)  # (H, (Hq + 2 Hkv) D)
    qkv_b = np.concatenate([w.get(f"{a}.{n}_proj.bias") for n in "qkv"]) if cfg.attention_bias else None
    qkv = _linear(g, normed, qkv_w, f"{base}/attn/qkv_proj", qkv_b)
    # packed q|k|v (key and value empty); RoPE inside, at `position_ids` (input 9)
    attn, _, _ = g.node(
        "GroupQueryAttention",
        [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", shared["seqlens_k"],
         shared["total_length"], shared["cos"], shared["sin"], "position_ids"],
        [f"{base}/attn/output_0", f"present.{i}.key", f"present.{i}.value"], f"{base}/attn/GroupQueryAttention",
        domain=MS, num_heads=cfg.heads, kv_num_heads=cfg.kv_heads, scale=float(cfg.head_dim**-0.5), do_rotary=1,
        rotary_interleaved=0)
    o_bias = w.get(f"{a}.o_proj.bias") if cfg.mlp_bias and w.has(f"{a}.o_proj.bias") else None
    out = _linear(g, attn, w.get(f"{a}.o_proj.weight").T, f"{base}/attn/o_proj", o_bias)
    post_w = g.const(f"{p}.post_attention_layernorm.weight", w.get(f"{p}.post_attention_layernorm.weight"))
    normed, residual = _skip_norm(g, out, residual, post_w, f"{base}/post_attention_layernorm", cfg.rms_eps)
    m = f"{p}.mlp"
    gate, up = (_linear(g, normed, w.get(f"{m}.{n}_proj.weight").T, f"{base}/mlp/{n}_proj",
                        w.get(f"{m}.{n}_proj.bias") if cfg.mlp_bias else None) for n in ("gate", "up"))
    (sig,) = g.node("Sigmoid", [gate], 1, f"{base}/mlp/Sigmoid")
    (silu,) = g.node("Mul", [gate, sig], 1, f"{base}/mlp/SiLU")
    (act,) = g.node("Mul", [silu, up], 1, f"{base}/mlp/Mul")
    down_b = w.get(f"{m}.down_proj.bias") if cfg.mlp_bias else None
    return _linear(g, act, w.get(f"{m}.down_proj.weight").T, f"{base}/mlp/down_proj", down_b), residual


def _shared(g: _Graph, cfg: DecoderConfig, cos: np.ndarray, sin: np.ndarray) -> dict[str, str]:
    """seqlens_k (B,) int32 = real tokens - 1; total_length () int32 = past + S; the rotary tables."""
    (summed,) = g.node("ReduceSum", ["attention_mask", g.const("/model/axes_1", np.array([1], np.int64))], 1,
                       "/model/attn_mask/ReduceSum", keepdims=0)
    (minus,) = g.node("Sub", [summed, g.const("/model/one_i64", np.array(1, np.int64))], 1, "/model/attn_mask/Sub")
    (seqlens,) = g.node("Cast", [minus], 1, "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
    (shape,) = g.node("Shape", ["attention_mask"], 1, "/model/attn_mask/Shape")
    (total,) = g.node("Gather", [shape, g.const("/model/one_scalar", np.array(1, np.int64))], 1,
                      "/model/attn_mask/Gather", axis=0)
    (total32,) = g.node("Cast", [total], 1, "/model/attn_mask/total_seq_len", to=TensorProto.INT32)
    return {"seqlens_k": seqlens, "total_length": total32, "cos": g.const("cos_cache", cos),
            "sin": g.const("sin_cache", sin)}


def io_values(cfg: DecoderConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs with the dynamic dims GenAI and optimum name."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = (cfg.kv_heads, cfg.head_dim)
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", cfg.vocab])]
    for i in range(cfg.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32,
                                                        ["batch_size", kv[0], "past_sequence_length", kv[1]]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32,
                                                         ["batch_size", kv[0], "total_sequence_length", kv[1]]))
    return inputs, outputs


def build_decoder(folder: Path, out_path: Path) -> dict[str, Any]:
    """Write the decoder graph of the HF folder `folder` to `out_path` (external data above 2 GiB)."""
    config = read_config(folder)
    cfg = DecoderConfig.from_config(config, where=str(folder))
    weights = Weights(folder)
    g = _Graph()
    cos, sin = rotary_tables(config, cfg)
    shared = _shared(g, cfg, cos, sin)
    embed = g.const("model.embed_tokens.weight", weights.get("model.embed_tokens.weight"))  # (V, H)
    (hidden,) = g.node("Gather", [embed, "input_ids"], 1, "/model/embed_tokens/Gather", axis=0)
    residual: str | None = None
    for i in range(cfg.layers):
        hidden, residual = _layer(g, weights, cfg, i, hidden, residual, shared)
    norm_w = g.const("model.norm.weight", weights.get("model.norm.weight"))
    normed, _ = _skip_norm(g, hidden, residual, norm_w, "/model/norm", cfg.rms_eps)
    if cfg.tied or not weights.has("lm_head.weight"):
        # One copy of the table in the file: lm_head reads the embedding through a Transpose (ONNX Runtime folds it
        # when the session loads; weight-only quantization turns the pair into MatMulNBits + GatherBlockQuantized).
        (head_w,) = g.node("Transpose", [embed], 1, "/lm_head/Transpose", perm=[1, 0])
    else:
        head_w = g.const("lm_head.weight", weights.get("lm_head.weight").T)
    g.node("MatMul", [normed, head_w], ["logits"], "/lm_head/MatMul")
    inputs, outputs = io_values(cfg)
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edgepack")
    model.ir_version = 10
    save_onnx(model, out_path)
    return {"layers": cfg.layers, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "tied_embeddings": cfg.tied,
            "kv_bytes_per_token_fp32": cfg.kv_bytes_per_token(4), "max_positions": cfg.max_positions,
            "ops": "GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMul"}


def genai_config(cfg: DecoderConfig, *, eos: int | list[int], bos: int | None, pad: int, filename: str,
                 context_length: int | None = None) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph (greedy search; past and present share one buffer of
    `max_length` tokens per layer, as GenAI's own builder sets for GroupQueryAttention: no per-step cache copy)."""
    context = context_length or cfg.max_positions
    return {
        "model": {
            "bos_token_id": bos if bos is not None else pad, "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": cfg.head_dim, "hidden_size": cfg.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers, "num_key_value_heads": cfg.kv_heads,
            },
            "eos_token_id": eos, "pad_token_id": pad, "type": cfg.model_type, "vocab_size": cfg.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
