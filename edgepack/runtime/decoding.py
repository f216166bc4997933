"""Autoregressive decoding of a KV-cache decoder graph with ONNX Runtime and numpy only.

This module runs inside fresh probe processes (`probe.measure_task`), so it imports nothing but numpy (the session
is handed in). It knows the graph contract of `edgepack.exporters.decoder`: `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.<i>.key|value` in; `logits`, `present.<i>.key|value` out. Two tasks:

- `quality`: teacher-forced next-token log-likelihood and argmax over held-out windows (perplexity, agreement),
  greedy generation from prompts (tokens, time to first token, decode tokens/s) and prefill tokens/s;
- `memory`: fill the cache to a context length in prefill chunks, decode a few tokens, and let the probe read the
  process's peak RSS (one context per fresh process, so each peak is that context's).

Every call is batch 1: GroupQueryAttention reads a row's length from the attention mask, which suits batch 1 (and
right padding) only.

Greedy decoding shares the past and present buffers (`SharedCache`), as onnxruntime-genai does with
`past_present_share_buffer`: one cache of the run's full length per layer, bound through IO binding as both the past
input and the present output, so GroupQueryAttention writes each new token's keys and values in place instead of
returning a copy of the whole cache every step (the graph is the same one; measured: the same tokens and logits).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
           "tensor(uint8)": np.uint8}


class KVSession:
    """An ONNX Runtime session of a decoder graph, with its cache layout read from the graph inputs."""

    def __init__(self, session: Any, *, kv_heads: int | None = None, head_dim: int | None = None) -> None:
        self.session = session
        # a past with an empty default (edgepack's graphs) is an overridable initializer, not a required input
        inputs = {i.name: i for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                                 key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        self.layers = len(self.past_names) // 2
        first = inputs[self.past_names[0]]
        # a graph may name these dims symbolically (GenAI's builder: 'kv_cache_dim'): the caller then says them
        self.kv_heads = first.shape[1] if isinstance(first.shape[1], int) else kv_heads
        self.head_dim = first.shape[3] if isinstance(first.shape[3], int) else head_dim
        if self.kv_heads is None or self.head_dim is None:
            raise ValueError(f"{self.past_names[0]} has symbolic cache dims {first.shape}: pass kv_heads and head_dim")
        self.cache_dtype = _DTYPES[first.type]
        self.input_names = set(inputs)  # graphs that compute positions from the mask (GenAI's) have no position_ids
        self.output_names = [o.name for o in session.get_outputs()]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]

    def empty(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), self.cache_dtype) for n in self.past_names}

    def step(self, ids: np.ndarray, past: Mapping[str, np.ndarray], start: int, *,
             logits: bool = True) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """Run tokens `ids` (S,) at positions start..start+S-1 on `past`; (logits (S, V), the new cache)."""
        length = len(ids)
        feed = {"input_ids": ids.reshape(1, length).astype(np.int64),
                "attention_mask": np.ones((1, start + length), np.int64), **past}
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(start, start + length, dtype=np.int64).reshape(1, length)
        wanted = (["logits"] if logits else []) + self.present_names
        outputs = self.session.run(wanted, feed)
        present = dict(zip(self.past_names, outputs[1:] if logits else outputs, strict=True))
        return (outputs[0][0] if logits else None), present


class SharedCache:
    """A static-size KV cache (`length` tokens per layer) shared by the past inputs and present outputs of a
    GroupQueryAttention graph through IO binding: each step writes its tokens in place (no per-step copy).

    The per-step Python work is kept to what changes: the cache buffers are bound once; a one-token step writes its
    token and position into preallocated arrays that stay bound, binds a view of one preallocated attention mask
    (its length is the only thing GroupQueryAttention reads from it) and writes the logits into a bound buffer.
    The logits a one-token step returns are that buffer: the next step overwrites them (copy to keep)."""

    def __init__(self, kv: KVSession, length: int) -> None:
        from onnxruntime import OrtValue

        self.kv, self.length, self._ortvalue = kv, length, OrtValue.ortvalue_from_numpy
        self.buffers = {n: OrtValue.ortvalue_from_numpy(np.zeros((1, kv.kv_heads, length, kv.head_dim),
                                                                 kv.cache_dtype)) for n in kv.past_names}
        self.binding = kv.session.io_binding()
        self.binding.bind_output("logits")  # first: a rebinding keeps its place, so outputs[0] stays the logits
        for past, present in zip(kv.past_names, kv.present_names, strict=True):
            self.binding.bind_ortvalue_input(past, self.buffers[past])
            self.binding.bind_ortvalue_output(present, self.buffers[past])
        self._mask = np.ones((1, length), np.int64)
        self._token = np.zeros((1, 1), np.int64)
        self._position = np.zeros((1, 1), np.int64)
        self._one = {"input_ids": self._ortvalue(self._token), "position_ids": self._ortvalue(self._position)}
        vocab = next(o.shape[-1] for o in kv.session.get_outputs() if o.name == "logits")
        self._logits = np.zeros((1, 1, vocab), np.float32) if isinstance(vocab, int) else None
        self._logits_value = None if self._logits is None else self._ortvalue(self._logits)
        self._bound_one = False  # whether the one-token inputs / logits buffer are the ones bound now

    def step(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Run tokens `ids` (S,) at positions start..start+S-1 on the cache so far; logits (S, V)."""
        length = len(ids)
        if start + length > self.length:
            raise ValueError(f"the shared cache holds {self.length} tokens; {start + length} asked")
        io, names = self.binding, self.kv.input_names
        io.bind_ortvalue_input("attention_mask", self._ortvalue(self._mask[:, :start + length]))
        if length == 1 and self._logits_value is not None:
            self._token[0, 0], self._position[0, 0] = int(ids[0]), start
            if not self._bound_one:
                for name, value in self._one.items():
                    if name in names:
                        io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output("logits", self._logits_value)
                self._bound_one = True
            self.kv.session.run_with_iobinding(io)
            return self._logits[0]
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64).reshape(1, length))
        if "position_ids" in names:
            io.bind_cpu_input("position_ids", np.arange(start, start + length, dtype=np.int64).reshape(1, length))
        io.bind_output("logits")
        self._bound_one = False
        self.kv.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()[0]


def cpu_session(path: Any, options: Any = None) -> Any:
    """A CPU InferenceSession that logs errors only: edgepack's decoder graphs give every past input an empty
    default (an initializer listed as a graph input), which ONNX Runtime reports once per input as a warning."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def fit_cache(feed: Mapping[str, np.ndarray], session: Any) -> dict[str, np.ndarray]:
    """`feed` with its past tensors in the session's cache type (float32, or int8 for a quantized cache)."""
    types = {i.name: _DTYPES.get(i.type) for i in session.get_inputs()}
    return {k: (v.astype(types[k]) if k.startswith("past_key_values.") and types.get(k) else v)
            for k, v in feed.items()}


def teacher_forced(kv: KVSession, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted token of every window: its negative log-likelihood and the model's argmax (float64, int32)."""
    nll, argmax = [], []
    for window in windows:
        logits, _ = kv.step(window, kv.empty(), 0)
        assert logits is not None
        shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)  # (T-1, V): position t predicts token t+1
        log_total = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64))
        nll.append(log_total - shifted[np.arange(len(window) - 1), window[1:]].astype(np.float64))
        argmax.append(logits[:-1].argmax(axis=-1).astype(np.int32))
    return np.concatenate(nll), np.concatenate(argmax)


def greedy(kv: KVSession, prompt: np.ndarray, new_tokens: int, *, shared: bool = False
           ) -> tuple[np.ndarray, float, list[float]]:
    """Greedy continuation of `prompt` by `new_tokens` tokens (EOS does not stop it, so runs compare position by
    position); returns (tokens, time to first token in s, per-token decode times in s). `shared`: through a
    `SharedCache` of the run's length (past and present in one buffer), else a new cache returned every step."""
    steps = greedy_steps(kv, prompt, new_tokens, shared=shared)
    token, ttft = next(steps)
    tokens, times = [token], []
    for token, seconds in steps:
        tokens.append(token)
        times.append(seconds)
    return np.array(tokens, np.int32), ttft, times


def greedy_steps(kv: KVSession, prompt: np.ndarray, new_tokens: int, *, shared: bool = False
                 ) -> Iterator[tuple[int, float]]:
    """`greedy` one token at a time: yields (token, seconds) for the prompt (time to first token) and then for
    each decode step, so a benchmark can advance several models in lockstep (each step of every model meets the
    same moment's load on shared cores)."""
    start = time.perf_counter()
    if shared:
        cache = SharedCache(kv, len(prompt) + new_tokens)
        run_step = cache.step
    else:
        past = kv.empty()

        def run_step(ids: np.ndarray, position: int) -> np.ndarray:
            nonlocal past
            logits, past = kv.step(ids, past, position)
            assert logits is not None
            return logits

    token = int(run_step(prompt, 0)[-1].argmax())
    yield token, time.perf_counter() - start
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        begin = time.perf_counter()
        token = int(run_step(np.array([token]), position)[-1].argmax())
        yield token, time.perf_counter() - begin


def prefill_seconds(kv: KVSession, ids: np.ndarray, *, runs: int) -> float:
    """Median wall time of a prefill of `ids` (one warm-up first)."""
    kv.step(ids, kv.empty(), 0)
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        kv.step(ids, kv.empty(), 0)
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def fill_cache(kv: KVSession, ids: np.ndarray, *, context: int, chunk: int, decode: int) -> dict[str, Any]:
    """Cache filled to `context` tokens in prefills of `chunk` tokens, then `decode` single-token steps."""
    past = kv.empty()
    filled = 0
    while filled < context:
        piece = ids[filled: min(context, filled + chunk)]
        _, past = kv.step(piece, past, filled, logits=False)
        filled += len(piece)
    begin = time.perf_counter()
    for position in range(filled, filled + decode):
        _, past = kv.step(ids[position: position + 1], past, position)
    cache_bytes = sum(a.nbytes for a in past.values())
    return {"context": context + decode, "cache_bytes": int(cache_bytes),
            "decode_ms_at_context": (time.perf_counter() - begin) / max(decode, 1) * 1e3}


def run(session: Any, payload: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Probe-task entry point: payload["task"] is "quality" or "memory"."""
    kv = KVSession(session, kv_heads=payload.get("kv_heads"), head_dim=payload.get("head_dim"))
    if payload["task"] == "memory":
        result = fill_cache(kv, arrays["ids"], context=int(payload["context"]), chunk=int(payload["chunk"]),
                            decode=int(payload["decode"]))
        return {"metrics": result, "arrays": {}}
    windows = [arrays[k] for k in sorted(k for k in arrays if k.startswith("window"))]
    prompts = [arrays[k] for k in sorted(k for k in arrays if k.startswith("prompt"))]
    nll, argmax = teacher_forced(kv, windows)
    generated, ttfts, decode_times = [], [], []
    for prompt in prompts:
        tokens, ttft, times = greedy(kv, prompt, int(payload["new_tokens"]), shared=bool(payload.get("shared_cache")))
        generated.append(tokens)
        ttfts.append(ttft)
        decode_times += times
    prefill = prefill_seconds(kv, arrays["prefill"], runs=int(payload.get("prefill_runs", 3)))
    metrics = {"perplexity": float(np.exp(nll.mean())), "evaluated_tokens": int(len(nll)),
               "ttft_ms": float(np.median(ttfts) * 1e3), "prompt_tokens": int(np.median([len(p) for p in prompts])),
               "decode_tokens_per_s": float(len(decode_times) / max(sum(decode_times), 1e-9)),
               "decode_ms_p50": float(np.median(decode_times) * 1e3),
               "prefill_tokens": int(len(arrays["prefill"])),
               "prefill_tokens_per_s": float(len(arrays["prefill"]) / prefill)}
    return {"metrics": metrics, "arrays": {"nll": nll, "argmax": argmax, "generated": np.stack(generated)}}
