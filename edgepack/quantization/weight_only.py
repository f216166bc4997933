"""Weight-only INT4 / INT8 of a decoder graph: every MatMul with a constant weight becomes ONNX Runtime's MatMulNBits.

What it does to the graph (FP32 in, a new file out; the input is never edited):
- each MatMul whose weight is an initializer, or the Transpose of one (a tied lm_head reading the embedding table),
  becomes MatMulNBits (`bits`, `block_size`, `accuracy_level`; codes and scales from `blockwise.py`);
- the embedding Gather becomes GatherBlockQuantized: for a tied table it reads lm_head's very codes and scales
  through Reshape nodes (one copy in the file), for an untied one its own codes at the same bits;
- `rtn` and `gptq` are ours (`blockwise.py`); `ort-default` and `ort-hqq` hand the MatMuls to ONNX Runtime's
  `MatMulNBitsQuantizer` (its DEFAULT and HQQ algorithms), after which the tied table is handled as above.
`gptq` needs calibration: the second moment X^T X of every quantized MatMul's input over the calibration tokens,
read from an ONNX Runtime session of the FP32 graph whose outputs include those inputs (in passes of a few layers,
so the statistics stay under ~200 MB).

`mixed_precision` picks INT8 for the layers that cost most at INT4: each decoder layer (all its MatMuls) and
lm_head is put alone at INT4 in the FP32 model and the calibration perplexity measured; then, most sensitive
first, units go to INT8 until the all-quantized model's calibration perplexity is within the budget (a bisection
on how many to promote). Held-out text is never used for the choice.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError
from edgepack.onnx_files import save_onnx
from edgepack.quantization.blockwise import (
    BlockQuantized,
    BlockSpec,
    check_divides,
    matmul_nbits_arrays,
    pack,
    quantize_gptq_batch,
    quantize_rtn,
)
from edgepack.quantization.weight_only_config import WeightOnlyVariant
from edgepack.reporter import get_reporter
from edgepack.runtime.decoding import cpu_session, fit_cache

MS = "com.microsoft"
LAYER_PART = re.compile(r"^layers?\.\d+$")
HESSIAN_PASS_BYTES = 512 * 2**20  # float32 statistics per pass over the calibration text (SmolLM2: one pass)
#: token rows gathered per input before their X^T X is added, and the most bytes they may hold
HESSIAN_CHUNK_ROWS = 1024
HESSIAN_CHUNK_BYTES = 64 * 2**20
FeedSource = Callable[[], Iterable[Feed]]


@dataclass
class Target:
    """A MatMul with a constant weight (K, N): its node, the weight, and the table it transposes when tied."""

    node: onnx.NodeProto
    weight: np.ndarray
    tied_table: str | None = None  # initializer name of the embedding the Transpose reads

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def unit(self) -> str:
        """The sensitivity unit: 'layers.<i>' for a decoder layer's MatMuls ('layer.<i>' for a BERT encoder's), else
        the node name (lm_head)."""
        for part in self.name.split("/"):
            if LAYER_PART.match(part):
                return part
        return "lm_head" if "lm_head" in self.name else self.name


@dataclass
class Plan:
    """Bits per target node (None: left in float)."""

    bits: dict[str, int | None] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- targets


def find_targets(model: onnx.ModelProto) -> list[Target]:
    inits = {i.name: i for i in model.graph.initializer}
    transposed = {n.output[0]: n for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits
                  and list(helper.get_attribute_value(a) for a in n.attribute if a.name == "perm") in ([[1, 0]], [])}
    targets = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = node.input[1]
        if weight in inits and len(inits[weight].dims) == 2:
            targets.append(Target(node, numpy_helper.to_array(inits[weight]).astype(np.float32)))
        elif weight in transposed:
            table = transposed[weight].input[0]
            targets.append(Target(node, numpy_helper.to_array(inits[table]).astype(np.float32).T.copy(), table))
    if not targets:
        raise BadInputError("weight-only quantization found no MatMul with a constant weight in the model; it "
                            "quantizes transformer graphs (decoders, encoders); use mode static for a CNN")
    return targets


def spec_for(variant: WeightOnlyVariant, bits: int) -> BlockSpec:
    # INT8 codes: symmetric unless asked otherwise; clip search pays off for 4 bits only
    return BlockSpec(bits=bits, block_size=variant.block_size, symmetric=variant.symmetric,
                     clip_search=variant.clip_search and bits == 4, grid=variant.grid)


def default_bits(target: Target, variant: WeightOnlyVariant) -> int:
    """The variant's bits for `target`: `head_bits` for lm_head where set."""
    return variant.head_bits if variant.head_bits is not None and target.unit == "lm_head" else variant.bits


def embedding_spec(variant: WeightOnlyVariant) -> BlockSpec:
    """An untied embedding table's codes: `embedding_bits` / `embedding_block_size`, else `head_bits` (a decoder's
    table goes with its head) or the variant's."""
    block = variant.embedding_block_size or variant.block_size
    bits = variant.embedding_bits or variant.head_bits or variant.bits
    return spec_for(variant.model_copy(update={"block_size": block}), bits)


# ------------------------------------------------------------------------------------------------ calibration


def collect_hessians(model_path: Path, targets: list[Target], feeds: FeedSource) -> dict[str, np.ndarray]:
    """X^T X / tokens for the input X of every target (by input tensor name), float32, in bounded passes."""
    model = onnx.load(str(model_path), load_external_data=False)
    widths = {t.node.input[0]: t.weight.shape[0] for t in targets}
    names = list(widths)
    hessians: dict[str, np.ndarray] = {}
    batch: list[str] = []
    for name in names:
        batch.append(name)
        if sum(widths[n] ** 2 * 4 for n in batch) >= HESSIAN_PASS_BYTES or name == names[-1]:
            hessians.update(_hessian_pass(model_path, model, batch, widths, feeds))
            batch = []
    return hessians


def _hessian_pass(model_path: Path, model: onnx.ModelProto, names: list[str], widths: Mapping[str, int],
                  feeds: FeedSource) -> dict[str, np.ndarray]:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="edgepack-hessian-") as tmp:
        path = Path(tmp) / "augmented.onnx"
        onnx.save_model(augmented, str(path))
        _link_external_data(model_path, Path(tmp))
        session = cpu_session(path)
        sums = {n: np.zeros((widths[n], widths[n]), np.float32) for n in names}
        pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
        tokens, rows = 0, 0
        row_bytes = 4 * sum(widths[n] for n in names)
        for feed in feeds():
            outputs = session.run(names, feed)
            for name, value in zip(names, outputs, strict=True):
                pending[name].append(value.reshape(-1, widths[name]).astype(np.float32))  # (T, K)
            tokens += int(feed["input_ids"].size)
            rows += int(feed["input_ids"].size)
            # one X^T X per chunk: short texts would each pay a K x K product (a decoder's long prefills flush each)
            if rows >= HESSIAN_CHUNK_ROWS or rows * row_bytes >= HESSIAN_CHUNK_BYTES:
                _accumulate(sums, pending)
                rows = 0
        _accumulate(sums, pending)
    if tokens == 0:
        raise BadInputError("gptq needs calibration text; the calibration split gave no tokens")
    return {n: (s / tokens).astype(np.float32) for n, s in sums.items()}


def _accumulate(sums: dict[str, np.ndarray], pending: dict[str, list[np.ndarray]]) -> None:
    for name, chunks in pending.items():
        if chunks:
            x = np.concatenate(chunks)
            sums[name] += x.T @ x
            chunks.clear()


def _link_external_data(model_path: Path, folder: Path) -> None:
    data = model_path.with_name(model_path.name + ".data")
    if data.exists():
        (folder / data.name).symlink_to(data.resolve())


# ------------------------------------------------------------------------------------------------ rewriting


def quantized_arrays(targets: list[Target], variant: WeightOnlyVariant, bits: int,
                     hessians: Mapping[str, np.ndarray] | None) -> dict[str, BlockQuantized]:
    """Codes of every target at `bits` (GPTQ where Hessians are given, else round to nearest)."""
    spec = spec_for(variant, bits)
    out = {}
    if hessians is None or variant.method != "gptq":
        for target in get_reporter().track(targets, total=len(targets), title=f"{variant.method} {bits}-bit"):
            out[target.name] = quantize_rtn(target.weight, spec)
        return out
    shapes: dict[tuple[int, ...], list[Target]] = {}
    for target in targets:  # layers of one shape go through GPTQ's column loop together
        shapes.setdefault(target.weight.shape, []).append(target)
    for group in get_reporter().track(list(shapes.values()), total=len(shapes), title=f"gptq {bits}-bit"):
        weights = np.stack([t.weight for t in group])
        stacked = np.stack([hessians[t.node.input[0]] for t in group])
        codes = quantize_gptq_batch(weights, stacked, spec, damp=variant.damp, act_order=variant.act_order)
        for target, q in zip(group, codes, strict=True):
            out[target.name] = q
    return out


def _matmul_nbits(target: Target, q: BlockQuantized, accuracy_level: int, inits: list[onnx.TensorProto]
                  ) -> onnx.NodeProto:
    k, n = target.weight.shape
    base = (target.tied_table and "lm_head.weight") or target.node.input[1]
    arrays = matmul_nbits_arrays(q)
    names = [f"{base}_Q{q.spec.bits}", f"{base}_scales"] + ([f"{base}_zero_points"] if "zero_points" in arrays else [])
    for name, key in zip(names, ("B", "scales", "zero_points"), strict=False):
        inits.append(numpy_helper.from_array(arrays[key], name))
    return helper.make_node("MatMulNBits", [target.node.input[0], *names], list(target.node.output),
                            name=target.name, domain=MS, K=k, N=n, bits=q.spec.bits, block_size=q.spec.block_size,
                            accuracy_level=accuracy_level)


def _shared_gather(gather: onnx.NodeProto, head: onnx.NodeProto, q: BlockQuantized,
                   inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """GatherBlockQuantized over lm_head's MatMulNBits codes (tied table): Reshapes, no second copy."""
    n, k = q.codes.shape  # (V, H)
    spec = q.spec
    blocks = k // spec.block_size
    prefix = gather.name
    shapes = {"data": [n, k * spec.bits // 8], "scales": [n, blocks], "zero_points": [n, -1]}
    inputs = []
    nodes = []
    for role, source in zip(("data", "scales", "zero_points"), head.input[1:4], strict=False):
        shape = f"{prefix}/{role}_shape"
        inits.append(numpy_helper.from_array(np.array(shapes[role], np.int64), shape))
        out = f"{prefix}/{role}"
        nodes.append(helper.make_node("Reshape", [source, shape], [out], name=f"{prefix}/Reshape_{role}"))
        inputs.append(out)
    data, scales, *zeros = inputs
    nodes.append(helper.make_node("GatherBlockQuantized", [data, gather.input[1], scales, *zeros],
                                  list(gather.output), name=gather.name, domain=MS, bits=spec.bits,
                                  block_size=spec.block_size, gather_axis=0, quantize_axis=1))
    return nodes


def _own_gather(gather: onnx.NodeProto, table: np.ndarray, spec: BlockSpec,
                inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """GatherBlockQuantized with the table's own codes (untied embedding), rows quantized along H."""
    q = quantize_rtn(table.T.copy(), spec)  # the table (V, H) as a (H, V) weight: one block row per token
    v, h = table.shape
    name = gather.input[0]
    arrays = {f"{name}_Q{spec.bits}": pack(q.codes, spec.bits).reshape(v, h * spec.bits // 8),
              f"{name}_scales": q.scales.reshape(v, h // spec.block_size)}
    if not spec.symmetric:
        arrays[f"{name}_zero_points"] = pack(q.zeros, spec.bits).reshape(v, -1)
    for key, value in arrays.items():
        inits.append(numpy_helper.from_array(value, key))
    names = list(arrays)
    return [helper.make_node("GatherBlockQuantized", [names[0], gather.input[1], *names[1:]], list(gather.output),
                             name=gather.name, domain=MS, bits=spec.bits, block_size=spec.block_size, gather_axis=0,
                             quantize_axis=1)]


def rewrite(model: onnx.ModelProto, targets: list[Target], codes: Mapping[str, BlockQuantized], *,
            variant: WeightOnlyVariant) -> dict[str, Any]:
    """Replace the quantized targets (and the embedding Gather) in `model`, in place; returns what was done."""
    by_name = {t.name: t for t in targets}
    new_inits: list[onnx.TensorProto] = []
    replaced: dict[str, onnx.NodeProto] = {}
    for name, q in codes.items():
        replaced[name] = _matmul_nbits(by_name[name], q, variant.accuracy_level, new_inits)
    embedding = _rewrite_embeddings(model, targets, replaced, codes, variant, new_inits)
    nodes = []
    for node in model.graph.node:
        if node.name in replaced:
            nodes.append(replaced[node.name])
        elif node.name in embedding["replace"]:
            nodes.extend(embedding["replace"][node.name])
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    _drop_dead(model)
    return {"embedding": embedding["note"]}


def _rewrite_embeddings(model: onnx.ModelProto, targets: list[Target], replaced: Mapping[str, onnx.NodeProto],
                        codes: Mapping[str, BlockQuantized], variant: WeightOnlyVariant,
                        inits: list[onnx.TensorProto]) -> dict[str, Any]:
    tied = {t.tied_table: t for t in targets if t.tied_table and t.name in codes}
    out: dict[str, list[onnx.NodeProto]] = {}
    notes = []
    for gather, table in _embedding_gathers(model, variant):
        if gather.input[0] in tied:
            head = tied[gather.input[0]]
            q = codes[head.name]
            out[gather.name] = _shared_gather(gather, replaced[head.name], q, inits)
            notes.append(f"tied embedding {gather.input[0]}: GatherBlockQuantized over lm_head's {q.spec.bits}-bit "
                         "MatMulNBits codes (one copy)")
        else:
            spec = embedding_spec(variant)
            array = numpy_helper.to_array(table).astype(np.float32)
            if array.shape[1] % spec.block_size:
                continue
            out[gather.name] = _own_gather(gather, array, spec, inits)
            notes.append(f"embedding {gather.input[0]}: GatherBlockQuantized, {spec.bits}-bit round to nearest")
    if not variant.embeddings:
        notes.append("embeddings left in float (embeddings: false)")
    return {"replace": out, "note": "; ".join(notes) or "no embedding table found"}


def _embedding_gathers(model: onnx.ModelProto, variant: WeightOnlyVariant
                       ) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """The Gathers of a 2-D constant table (embeddings) that `variant` quantizes (none with embeddings: false)."""
    if not variant.embeddings:
        return []
    tables = {i.name: i for i in model.graph.initializer}
    return [(n, tables[n.input[0]]) for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in tables and len(tables[n.input[0]].dims) == 2]


def untied_table_overrides(model: onnx.ModelProto, targets: list[Target],
                           variant: WeightOnlyVariant) -> dict[str, np.ndarray]:
    """Initializer name -> the dequantized codes of every untied embedding table `rewrite` quantizes (what the
    fake-quantized model of mixed precision reads; a tied table follows its lm_head's codes)."""
    tied = {t.tied_table for t in targets if t.tied_table}
    spec = embedding_spec(variant)
    out = {}
    for gather, table in _embedding_gathers(model, variant):
        array = numpy_helper.to_array(table).astype(np.float32)
        if gather.input[0] not in tied and not array.shape[1] % spec.block_size:
            out[gather.input[0]] = quantize_rtn(array.T.copy(), spec).dequantize().T.copy()
    return out


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (the tied Transpose) and initializers no node reads."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ---------------------------------------------------------------------------------------------------- drivers


def quantize_weight_only(fp32: Path, out: Path, *, variant: WeightOnlyVariant, calibration: FeedSource | None,
                         plan: Mapping[str, int | None] | None = None,
                         hessians: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Write the weight-only model of `fp32` to `out`; `plan` (node -> bits, None = float) overrides `bits`."""
    start = time.perf_counter()
    if variant.method.startswith("ort-"):
        return _quantize_with_ort(fp32, out, variant=variant, start=start)
    model = onnx.load(str(fp32))
    targets = [t for t in find_targets(model) if t.name not in variant.exclude_nodes]
    chosen = {t.name: (plan.get(t.name, variant.bits) if plan is not None else default_bits(t, variant))
              for t in targets}
    for target in targets:
        if chosen[target.name] is not None:
            check_divides(spec_for(variant, 4), target.weight.shape[0], where=f"node {target.name}")
    if variant.method == "gptq" and hessians is None:
        if calibration is None:
            raise BadInputError("method gptq needs calibration data")
        with get_reporter().step(f"gptq: input statistics of {len(targets)} MatMuls on calibration text"):
            hessians = collect_hessians(fp32, targets, calibration)
    codes: dict[str, BlockQuantized] = {}
    for bits in sorted({b for b in chosen.values() if b is not None}):
        group = [t for t in targets if chosen[t.name] == bits]
        codes.update(quantized_arrays(group, variant, bits, hessians))
    done = rewrite(model, targets, codes, variant=variant)
    if variant.kv_cache == "int8":
        from edgepack.quantization.kv_cache import collect_kv_absmax, int8_kv_cache

        if calibration is None:
            raise BadInputError("kv_cache int8 needs calibration data for its scales")
        done["kv_cache"] = int8_kv_cache(model, collect_kv_absmax(fp32, calibration))
    save_onnx(model, out)
    counts = {str(b): sum(1 for v in chosen.values() if str(v) == b) for b in sorted({str(v) for v in chosen.values()})}
    return {"method": variant.method, "bits": variant.bits, "block_size": variant.block_size,
            "symmetric": variant.symmetric, "accuracy_level": variant.accuracy_level, "clip_search": variant.clip_search,
            "nodes_by_bits": counts, "embedding": done["embedding"], "plan": dict(chosen),
            "kv_cache": done.get("kv_cache", {"kv_cache": "float32"}),
            "quantize_s": round(time.perf_counter() - start, 2)}


def _quantize_with_ort(fp32: Path, out: Path, *, variant: WeightOnlyVariant, start: float) -> dict[str, Any]:
    """ONNX Runtime's MatMulNBitsQuantizer (DEFAULT or HQQ); it skips the tied lm_head (no constant weight)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(fp32))
    for target in find_targets(model):
        check_divides(spec_for(variant, variant.bits), target.weight.shape[0], where=f"node {target.name}")
    if variant.method == "ort-hqq":
        config: Any = HQQWeightOnlyQuantConfig(block_size=variant.block_size, bits=variant.bits)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=variant.block_size, is_symmetric=variant.symmetric,
                                              accuracy_level=variant.accuracy_level, bits=variant.bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=list(variant.exclude_nodes))
    quantizer.process()
    save_onnx(quantizer.model.model, out)
    left = sum(1 for n in quantizer.model.model.graph.node if n.op_type == "MatMul")
    return {"method": variant.method, "bits": variant.bits, "block_size": variant.block_size,
            "symmetric": variant.symmetric, "accuracy_level": variant.accuracy_level, "matmuls_left_float": left,
            "embedding": "left in float by ONNX Runtime's quantizer (its lm_head reads the table through a "
                         "Transpose: 'MatMul doesn't have const weight')",
            "quantize_s": round(time.perf_counter() - start, 2)}


# ------------------------------------------------------------------------------------------- mixed precision


def calibration_nll(model: Path, feeds: FeedSource, *, overrides: Mapping[str, np.ndarray] | None = None) -> float:
    """Mean next-token NLL over the calibration prefills, with ONNX Runtime; `overrides` replace initializers (the
    dequantized weights of a fake-quantized model) without writing a new file."""
    session, _kept = _override_session(model, overrides)
    total, count = 0.0, 0
    for feed in feeds():
        logits = session.run(["logits"], fit_cache(feed, session))[0][0]  # (T, V) float32
        ids = feed["input_ids"][0]
        shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
        picked = shifted[np.arange(len(ids) - 1), ids[1:]].astype(np.float64)
        total += float((np.log(np.exp(shifted).sum(-1, dtype=np.float64)) - picked).sum())
        count += len(ids) - 1
    return total / max(count, 1)


def _overrides(targets: Iterable[Target], codes: Mapping[str, BlockQuantized]) -> dict[str, np.ndarray]:
    """Initializer name -> dequantized weight, for the targets in `codes` (a tied lm_head overrides the table)."""
    out = {}
    for target in targets:
        if target.name in codes:
            weight = codes[target.name].dequantize()  # (K, N)
            if target.tied_table:
                out[target.tied_table] = weight.T.copy()
            else:
                out[target.node.input[1]] = weight
    return out


@dataclass(frozen=True)
class MixedFidelity:
    """How mixed precision scores a fake-quantized model, as the model's family declares it
    (`ModelFamily.weight_only_fidelity`): a loss on calibration feeds (lower is better; `overrides` replace
    initializers of the FP32 graph) and the most it may rise above the FP32 graph's own loss."""

    kind: str  # "perplexity" (decoders: next-token NLL) | "cosine" (1 - mean cosine of the primary output)
    loss: Callable[[FeedSource, Mapping[str, np.ndarray] | None], float]
    budget: float
    describe: str


def perplexity_fidelity(fp32: Path, max_perplexity_ratio: float) -> MixedFidelity:
    return MixedFidelity("perplexity", lambda feeds, overrides: calibration_nll(fp32, feeds, overrides=overrides),
                         float(np.log(max_perplexity_ratio)), f"calibration perplexity within {max_perplexity_ratio}x "
                         "of FP32")


def cosine_fidelity(fp32: Path, output: str, max_cosine_drop: float) -> MixedFidelity:
    """1 - mean cosine of `output` (an encoder's embedding, a classifier's logits) to the FP32 graph's on the same
    calibration feeds; the FP32 outputs of a feed source are computed once."""
    reference: dict[int, list[np.ndarray]] = {}

    def outputs(feeds: FeedSource, overrides: Mapping[str, np.ndarray] | None) -> list[np.ndarray]:
        session, _kept = _override_session(fp32, overrides)
        return [session.run([output], feed)[0].reshape(-1) for feed in feeds()]

    def loss(feeds: FeedSource, overrides: Mapping[str, np.ndarray] | None) -> float:
        if id(feeds) not in reference:
            reference[id(feeds)] = outputs(feeds, None)
        got = outputs(feeds, overrides)
        cosines = [float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
                   for a, b in zip(reference[id(feeds)], got, strict=True)]
        return 1.0 - float(np.mean(cosines))

    return MixedFidelity("cosine", loss, max_cosine_drop, f"1 - mean cosine of {output} vs FP32 on the calibration "
                         f"texts at most {max_cosine_drop}")


def _override_session(model: Path, overrides: Mapping[str, np.ndarray] | None) -> tuple[Any, dict[str, Any]]:
    """A CPU session of `model` with initializers replaced; the OrtValues returned must outlive the session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    kept = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            for name, value in (overrides or {}).items()}
    for name, value in kept.items():
        options.add_initializer(name, value)
    return cpu_session(model, options), kept


def mixed_precision(fp32: Path, *, variant: WeightOnlyVariant, calibration: FeedSource,
                    hessians: Mapping[str, np.ndarray] | None, fidelity: MixedFidelity | None = None
                    ) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Bits per node so that the fake-quantized model's `fidelity` loss (default: the calibration perplexity,
    `variant.mixed.max_perplexity_ratio`) rises at most its budget above FP32's.

    Sensitivity and the search use fake quantization (dequantized weights as initializer overrides of the FP32
    graph, float MatMuls); the chosen plan is then written for real by `quantize_weight_only`.
    """
    assert variant.mixed is not None
    fidelity = fidelity or perplexity_fidelity(fp32, variant.mixed.max_perplexity_ratio)
    model = onnx.load(str(fp32))
    targets = [t for t in find_targets(model) if t.name not in variant.exclude_nodes]
    for target in targets:
        check_divides(spec_for(variant, variant.bits), target.weight.shape[0], where=f"node {target.name}")
    tables = untied_table_overrides(model, targets, variant)  # the budget is judged with them quantized too
    low = quantized_arrays(targets, variant, variant.bits, hessians)
    high = quantized_arrays(targets, variant.model_copy(update={"method": "rtn"}), variant.mixed.promote_bits, None)
    fp32_loss = fidelity.loss(calibration, None)
    # lm_head at `head_bits` 8 is promoted from the start, outside the search
    fixed = {"lm_head"} if variant.head_bits == variant.mixed.promote_bits else set()
    units = [u for u in dict.fromkeys(t.unit for t in targets) if u not in fixed]
    ranking_feeds = calibration_feeds(list(calibration())[: variant.mixed.sensitivity_samples])
    ranking_base = fidelity.loss(ranking_feeds, None)

    def loss_with_low(low_units: set[str], *, others_high: bool = True, feeds: FeedSource = calibration) -> float:
        chosen = {t.name: low[t.name] if t.unit in low_units else high[t.name] for t in targets
                  if t.unit in low_units or others_high}
        return fidelity.loss(feeds, {**(tables if others_high else {}), **_overrides(targets, chosen)})

    sensitivity = {}
    with get_reporter().step(f"mixed precision: {len(units)} units, each alone at INT{variant.bits}"):
        for unit in units:
            sensitivity[unit] = loss_with_low({unit}, others_high=False, feeds=ranking_feeds) - ranking_base
    ranked = sorted(units, key=lambda u: -sensitivity[u])
    tried = {len(ranked): loss_with_low(set())}  # every unit at the promoted bits
    lo, hi = 0, len(ranked)
    while lo < hi:  # the fewest promoted units (most sensitive first) whose model meets the budget
        mid = (lo + hi) // 2
        tried[mid] = loss_with_low(set(ranked[mid:]))
        if tried[mid] - fp32_loss <= fidelity.budget:
            hi = mid
        else:
            lo = mid + 1
    promoted = set(ranked[:lo])
    loss = tried[lo] if lo in tried else loss_with_low(set(ranked[lo:]))
    plan: dict[str, int | None] = {t.name: variant.mixed.promote_bits if t.unit in promoted | fixed else variant.bits
                                   for t in targets}
    all_low = tried.get(0, loss_with_low(set(ranked)))
    info = {"fidelity": fidelity.kind, "budget": fidelity.describe, "units": len(units),
            "promoted": [u for u in ranked if u in promoted], "promote_bits": variant.mixed.promote_bits,
            "met_on_calibration": bool(loss - fp32_loss <= fidelity.budget),
            "method": f"each unit (a layer's MatMuls, or lm_head with its tied table) alone at INT{variant.bits} in "
                      f"the FP32 graph (dequantized weights), {fidelity.kind} on calibration text; then a bisection "
                      f"on how many of the most sensitive go to INT{variant.mixed.promote_bits}"}
    info.update(_mixed_figures(fidelity, loss - fp32_loss, all_low - fp32_loss,
                               {u: sensitivity[u] for u in ranked[:10]}))
    if fidelity.kind == "perplexity":
        info["max_perplexity_ratio"] = variant.mixed.max_perplexity_ratio
    else:
        info["max_cosine_drop"] = fidelity.budget
    return plan, info


def _mixed_figures(fidelity: MixedFidelity, rise: float, all_low_rise: float,
                   top: Mapping[str, float]) -> dict[str, Any]:
    """The plan's figures in the fidelity's own unit: a perplexity ratio, or a cosine."""
    if fidelity.kind == "perplexity":
        return {"calibration_perplexity_ratio_fake_quant": float(np.exp(rise)),
                "all_low_ratio_fake_quant": float(np.exp(all_low_rise)),
                "sensitivity_top": [{"unit": u, "perplexity_ratio_alone": float(np.exp(v))} for u, v in top.items()]}
    return {"calibration_cosine_fake_quant": 1.0 - rise, "all_low_cosine_fake_quant": 1.0 - all_low_rise,
            "sensitivity_top": [{"unit": u, "cosine_alone": 1.0 - v} for u, v in top.items()]}


def calibration_feeds(feeds: Iterator[Feed] | Iterable[Feed]) -> FeedSource:
    """A re-iterable feed source from a finite iterable (kept in memory: a few dozen short prefills)."""
    kept = list(feeds)
    return lambda: iter(kept)
