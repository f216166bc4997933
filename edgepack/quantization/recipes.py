"""What to hand onnxruntime's QDQQuantizer, per architecture family: nodes by graph pattern, options, SmoothQuant.

onnxruntime.quantization does the quantizing; a recipe only decides what it is given. Per-architecture knowledge is
data (`QuantRecipe`, registered in `QUANT_RECIPES`); `plan_quantization` turns it into a `QuantPlan` for one model by
matching graph patterns (never node names of a particular model).

Use (the driver's order; the rewrite must come before calibration, since it creates the tensors ORT quantizes):
    plan = plan_quantization(model)
    absmax = smoothquant.collect_channel_absmax(path, feeds, tensors=[p.tensor for p in plan.branch_points
                                                                       if p.alpha is not None])
    model = smoothquant.apply_smoothquant(model, absmax, points=plan.branch_points)   # save, then calibrate it
    QDQQuantizer(model, plan.per_channel, False, <plan.weight_type>, <plan.activation_type>, ranges,
                 plan.nodes_to_quantize, plan.nodes_to_exclude, plan.op_types_to_quantize, plan.extra_options)

Why the transformer-encoder recipe looks the way it does (all-MiniLM-L6-v2, 200 calibration and 130 + 180 + 476
held-out sentences, ORT 1.32 CPU EP, batch 1):
- ORT's defaults (every op type ORT knows, MinMax) give embedding cosine 0.82 (0.60 on padded batches: the attention
  mask Add is quantized). Quantizing only the weight MatMuls and the embedding Gathers gives 0.989.
- ORT's QDQ quantizer hands one shared Q->DQ pair to *every* consumer of a quantized tensor, so the residual Add /
  LayerNorm read the 8-bit copy of the residual stream. Giving the MatMuls their own branch (`BranchPoint`) keeps the
  residual in float: 0.989 -> 0.993, and 18 DequantizeLinear nodes fewer at run time.
- The remaining error is outlier channels in MatMul inputs (LayerNorm output up to 28 with a median channel max ~2;
  GELU output up to 25). Clipping ranges (percentile, MSE) does not help (0.990-0.993); SmoothQuant does:
  migrating scale into the weights per role gives 0.9972 mean / 0.994 min (alphas below, measured per role).
  By default the driver searches the alpha per layer on calibration data instead (`smoothquant.search_alphas`,
  recipe key `quantize.smoothquant: search`); the per-role values here are its `recipe` mode and say which roles
  are smoothed at all. On MiniLM the search lands on the same figures (0.9972 / 0.9936) with alphas of 0.2-0.5
  at q/k/v, 0.7-0.95 at FFN-in and 0.85-1.0 at FFN-out, so it needs no tuning for another encoder.
- uint8 asymmetric activations beat int8 symmetric (0.993 vs 0.982); per-channel weights beat per-tensor (0.993 vs
  0.963); reduce_range costs accuracy (0.991) and the AVX2 u8s8 saturation it avoids measured small here.
- The attention MatMuls (QK^T, PV) stay float: quantizing them gained no accuracy and at most ~3% latency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import onnx

from edgepack.errors import BadInputError, did_you_mean
from edgepack.registry import Registry

# Roles of a weight MatMul in a transformer block, found from the graph around its activation input.
ROLE_QKV = "qkv"            # LayerNorm output shared by >= 2 weight MatMuls (query / key / value projections)
ROLE_FFN_IN = "ffn_in"      # LayerNorm output read by one weight MatMul (FFN up-projection)
ROLE_FFN_OUT = "ffn_out"    # output of the FFN nonlinearity (GELU op, erf/tanh GELU pattern, ReLU, ...)
ROLE_ATTN_OUT = "attn_out"  # attention context (after the probabilities x V MatMul, reshaped)
ROLE_LINEAR = "linear"      # any other weight MatMul

_LAYER_NORMS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"})
_GELU_OPS = frozenset({"Gelu", "BiasGelu", "FastGelu", "QuickGelu"})
_ACTIVATION_OPS = _GELU_OPS | {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "LeakyRelu"}
_DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
#: Fused ops of onnxruntime.transformers' optimizer (the `fused` graph, `quantization.fused`): Attention holds the
#: packed q/k/v weight (C, 3C) at input 1; EmbedLayerNormalization the word table (V, C) at input 2.
_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention"})
_BRANCHED_OPS = frozenset({"MatMul", "Attention"})  # weight layers whose activation input gets its own branch


@dataclass(frozen=True)
class BranchPoint:
    """A float tensor whose quantized weight MatMuls get their own input, so its other readers stay float.

    `smoothquant.apply_smoothquant` inserts `Mul(tensor, 1/s)` (and scales the MatMul weights by s) when `alpha` is
    set, else an `Identity` (ORT removes it at session creation; the residual keeps reading the float tensor).
    """

    tensor: str                  # activation, e.g. a LayerNorm output (B, T, C)
    matmuls: tuple[str, ...]     # names of the MatMuls with an initializer B (C, N) that read `tensor`
    role: str                    # ROLE_* above
    alpha: float | None          # SmoothQuant migration strength; None = isolate only, no smoothing


@dataclass(frozen=True)
class QuantPlan:
    """What to hand ORT's QDQQuantizer for one model (plus the graph rewrite that must run before calibration)."""

    op_types_to_quantize: tuple[str, ...]
    nodes_to_quantize: tuple[str, ...] | None       # None = every node of `op_types_to_quantize`
    nodes_to_exclude: tuple[str, ...]
    range_methods: dict[str, str]                   # tensor -> calibrator name, for tensors not using the default
    tensor_overrides: dict[str, list[dict]]         # ORT TensorQuantOverrides
    extra_options: dict[str, object]                # ORT extra_options we set on purpose (see the recipe)
    notes: tuple[str, ...]                          # human-readable reasons, for the manifest
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    branch_points: tuple[BranchPoint, ...] = ()     # apply with smoothquant.apply_smoothquant before calibrating
    float_outputs: bool = False                     # the graph outputs leave the last op in float (no Q/DQ)


@dataclass(frozen=True)
class QuantRecipe:
    """Per-architecture quantization knowledge, as data."""

    op_types_to_quantize: tuple[str, ...]
    select_weight_layers: bool                  # True: list the weight layers (+ embeddings); False: all op types
    quantize_embeddings: bool                   # Gather from a float initializer table (V, C)
    isolate_float_consumers: bool               # residual / LayerNorm readers keep the float tensor
    smoothquant_alpha: Mapping[str, float]      # role -> alpha; roles absent are not smoothed
    extra_options: Mapping[str, object]
    notes: tuple[str, ...]
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    float_outputs: bool = False


QUANT_RECIPES: Registry[QuantRecipe] = Registry("quantization recipe")

QUANT_RECIPES.register("transformer-encoder")(QuantRecipe(
    op_types_to_quantize=("MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization"),
    select_weight_layers=True,
    quantize_embeddings=True,  # word embeddings are half of MiniLM's parameters: needed for a 0.25x file
    isolate_float_consumers=True,
    # Measured on MiniLM per role (1 - cosine contributed by the role alone, no smoothing -> best alpha):
    # qkv 0.0013 -> 0.0011 (a=0.3; a>=0.5 is worse), ffn_in 0.0024 -> 0.0003 (a=0.7), ffn_out 0.0030 -> 0.0010
    # (a=0.85; a=0.5 is much worse). attn_out (0.0004) is left alone: a Mul there costs more than it gains.
    smoothquant_alpha=MappingProxyType({ROLE_QKV: 0.3, ROLE_FFN_IN: 0.7, ROLE_FFN_OUT: 0.85}),
    extra_options=MappingProxyType({
        # MatMul / Gemm outputs feed a float bias Add: a Q there only adds error, and without it ORT fuses
        # DQ -> MatMul into MatMulIntegerToFloat (int8 GEMM, float out) instead of QLinearMatMul + DQ.
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
        # Attention score / context MatMuls (two activations) stay float: no accuracy gain, <= 3% latency.
        "MatMulConstBOnly": True,
        # uint8 asymmetric activations: LayerNorm / GELU outputs are skewed; int8 symmetric measured 0.982 vs 0.993.
        "ActivationSymmetric": False,
        # Symmetric per-channel int8 weights (zero-point 0): what MLAS and QNN expect.
        "WeightSymmetric": True,
    }),
    notes=(
        "weight MatMuls and embedding Gathers in INT8 (QDQ, per-channel symmetric weights, uint8 activations); "
        "Add, LayerNorm, Softmax, GELU and the attention MatMuls stay float",
        "quantized MatMuls read their own branch of a shared activation, so the residual stream stays float",
        "SmoothQuant (Xiao et al. 2023) on the q/k/v, FFN-in and FFN-out inputs, as an explicit Mul: BERT is "
        "post-LayerNorm (the LayerNorm output is also the residual) and GELU does not commute with scaling",
        "activation ranges: MinMax (percentile / MSE clipping measured worse on MiniLM: outliers carry signal)",
    ),
))

QUANT_RECIPES.register("cnn")(QuantRecipe(
    op_types_to_quantize=("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool",
                          "AveragePool", "GlobalAveragePool", "Concat", "Resize", "Reshape", "Flatten", "Transpose",
                          "Squeeze", "Unsqueeze", "Pad", "Sigmoid", "LeakyRelu", "Split", "Slice"),
    select_weight_layers=False,
    quantize_embeddings=False,
    isolate_float_consumers=False,
    smoothquant_alpha=MappingProxyType({}),
    # uint8 asymmetric activations (ReLU / ReLU6 outputs are one-sided; a removable Clip / Relu folds into the
    # range of the op before it), symmetric per-channel int8 weights (zero-point 0, what MLAS and QNN expect)
    extra_options=MappingProxyType({"ActivationSymmetric": False, "WeightSymmetric": True}),
    notes=(
        "whole-graph INT8 (QDQ): ORT fuses QLinearConv / QLinearAdd / QLinearGlobalAveragePool / QGemm; graph "
        "normalised first (BatchNorm and Pad folded into Conv: a Pad between Q/DQ pairs ran in float)",
        "bias correction of every Conv / Gemm on the calibration set (EfficientNet-Lite0: logit cosine 0.976 -> "
        "0.994 with MinMax); learned rounding (AdaRound), cross-layer equalization and float activations (named tensors "
        "kept float with the layers around them) are options (quantize.cnn), measured in docs/benchmarks.md",
        "graph outputs (logits, probability maps) stay float: their 8-bit step alone flipped close top-1 calls; "
        "graph inputs take MinMax ranges whatever the calibrator (pixels are data: (x - 127) / 128 then lands "
        "exactly on the uint8 grid)",
    ),
    float_outputs=True,
))

QUANT_RECIPES.register("generic")(QuantRecipe(
    op_types_to_quantize=("MatMul", "Gemm", "Conv"),
    select_weight_layers=True,
    quantize_embeddings=False,
    isolate_float_consumers=True,
    smoothquant_alpha=MappingProxyType({}),
    extra_options=MappingProxyType({"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                    "MatMulConstBOnly": True, "ActivationSymmetric": False,
                                    "WeightSymmetric": True}),
    notes=("weight layers only (MatMul / Gemm / Conv with a constant weight); everything else float",),
))


# --------------------------------------------------------------------------------------------- graph patterns


@dataclass(frozen=True)
class _Graph:
    nodes: tuple[onnx.NodeProto, ...]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    float_weights: dict[str, tuple[int, ...]]   # float initializer name -> shape
    outputs: frozenset[str]


def _index(model: onnx.ModelProto) -> _Graph:
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return _Graph(
        nodes=tuple(graph.node),
        producer={out: node for node in graph.node for out in node.output},
        consumers=consumers,
        float_weights={t.name: tuple(t.dims) for t in graph.initializer if t.data_type in floats},
        outputs=frozenset(o.name for o in graph.output),
    )


def _is_weight_layer(node: onnx.NodeProto, g: _Graph) -> bool:
    """MatMul / Gemm / Conv / fused Attention whose weight (input 1) is a float initializer and whose input 0 is
    an activation."""
    if node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention") or len(node.input) < 2:
        return False
    weight = g.float_weights.get(node.input[1])
    if weight is None or node.input[0] in g.float_weights:
        return False
    return len(weight) == 2 if node.op_type in ("MatMul", "Gemm", "Attention") else True


def _is_embedding(node: onnx.NodeProto, g: _Graph) -> bool:
    """Gather rows of a float (V, C) table by indices computed at run time: the embedding lookup (or the fused
    EmbedLayerNormalization, word table at input 2)."""
    if node.op_type == "EmbedLayerNormalization":
        return len(node.input) > 2 and len(g.float_weights.get(node.input[2], ())) == 2
    table = g.float_weights.get(node.input[0]) if node.op_type == "Gather" else None
    return table is not None and len(table) == 2 and node.input[1] not in g.float_weights


def _upstream_ops(tensor: str, g: _Graph, depth: int) -> set[str]:
    """Op types within `depth` producer hops above `tensor` (all inputs followed)."""
    found: set[str] = set()
    frontier = [tensor]
    for _ in range(depth):
        nodes = [g.producer[t] for t in frontier if t in g.producer]
        found.update(n.op_type for n in nodes)
        frontier = [t for n in nodes for t in n.input if t and t not in g.float_weights]
    return found


def _is_nonlinearity_output(tensor: str, g: _Graph) -> bool:
    """GELU as one op, or decomposed: x * 0.5 * (1 + erf(x / sqrt 2)) / the tanh form, or another activation."""
    node = g.producer.get(tensor)
    if node is None:
        return False
    if node.op_type in _ACTIVATION_OPS:
        return True
    return node.op_type == "Mul" and bool(_upstream_ops(tensor, g, depth=4) & {"Erf", "Tanh"})


def _follows_attention(tensor: str, g: _Graph) -> bool:
    """Context layer: Reshape/Transpose chain back to a MatMul of two activations (probabilities x V)."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type in _DATA_MOVEMENT:
        node = g.producer.get(node.input[0])
    if node is not None and node.op_type in _ATTENTION_OPS:
        return True
    return node is not None and node.op_type == "MatMul" and not any(i in g.float_weights for i in node.input)


def weight_matmul_role(node: onnx.NodeProto, g: _Graph, selected: set[str]) -> str:
    """Role of a quantized weight MatMul from the pattern around its activation input (ROLE_*)."""
    tensor = node.input[0]
    producer = g.producer.get(tensor)
    if node.op_type in _ATTENTION_OPS:
        return ROLE_QKV
    if _is_nonlinearity_output(tensor, g):
        return ROLE_FFN_OUT
    if producer is not None and producer.op_type in _LAYER_NORMS:
        siblings = [c for c in g.consumers.get(tensor, []) if c.op_type == "MatMul" and c.name in selected]
        return ROLE_QKV if len(siblings) >= 2 else ROLE_FFN_IN
    if _follows_attention(tensor, g):
        return ROLE_ATTN_OUT
    return ROLE_LINEAR


def _branch_points(g: _Graph, recipe: QuantRecipe, selected: set[str]) -> tuple[BranchPoint, ...]:
    """One BranchPoint per activation whose selected MatMuls need smoothing or share it with float readers."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in g.nodes:
        if node.op_type in _BRANCHED_OPS and node.name in selected:
            groups.setdefault(node.input[0], []).append(node)
    points = []
    for tensor, matmuls in groups.items():
        role = weight_matmul_role(matmuls[0], g, selected)
        alpha = recipe.smoothquant_alpha.get(role)
        readers = g.consumers.get(tensor, [])
        shared = tensor in g.outputs or any(r.name not in {m.name for m in matmuls} for r in readers)
        if alpha is None and not (shared and recipe.isolate_float_consumers):
            continue
        points.append(BranchPoint(tensor, tuple(m.name for m in matmuls), role, alpha))
    return tuple(points)


# ------------------------------------------------------------------------------------------------ public API


def detect_family(model: onnx.ModelProto) -> str:
    """'transformer-encoder' (Softmax or fused Attention + LayerNorm + weight MatMuls), 'cnn' (Conv), else
    'generic'."""
    g = _index(model)
    ops = {node.op_type for node in g.nodes}
    has_weight_matmul = any(n.op_type == "MatMul" and _is_weight_layer(n, g) for n in g.nodes)
    if ("Softmax" in ops or ops & _ATTENTION_OPS) and ops & _LAYER_NORMS and has_weight_matmul:
        return "transformer-encoder"
    if ops & {"Conv", "ConvTranspose"}:
        return "cnn"
    return "generic"


def plan_quantization(model: onnx.ModelProto, *, family: str = "auto", exclude: Sequence[str] = ()) -> QuantPlan:
    """The QDQQuantizer inputs for `model`: recipe `family` ('auto' = `detect_family`), minus `exclude` node names."""
    name = detect_family(model) if family == "auto" else family
    recipe = QUANT_RECIPES.get(name)
    g = _index(model)
    _check_exclude(g, exclude)
    excluded = set(exclude)
    notes = [f"family: {name}" + (" (detected)" if family == "auto" else ""), *recipe.notes]
    if not recipe.select_weight_layers:
        plan = _plan(recipe, None, tuple(exclude), (), notes)
        if recipe.float_outputs:  # the data itself is never clipped: graph inputs take MinMax ranges
            inits = {t.name for t in model.graph.initializer}
            plan = replace(plan, range_methods={i.name: "minmax" for i in model.graph.input if i.name not in inits})
        return plan
    selected = [n for n in g.nodes if n.name not in excluded and n.op_type in recipe.op_types_to_quantize
                and (_is_weight_layer(n, g) or (recipe.quantize_embeddings and _is_embedding(n, g)))]
    _check_named(selected)
    names = {n.name for n in selected}
    points = _branch_points(g, recipe, names)
    notes.append(f"{len(selected)} of {len(g.nodes)} nodes quantized; {len(points)} branch points "
                 f"({sum(p.alpha is not None for p in points)} smoothed)")
    return _plan(recipe, tuple(n.name for n in selected), tuple(exclude), points, notes)


def _plan(recipe: QuantRecipe, nodes: tuple[str, ...] | None, exclude: tuple[str, ...],
          points: tuple[BranchPoint, ...], notes: list[str]) -> QuantPlan:
    return QuantPlan(
        op_types_to_quantize=recipe.op_types_to_quantize,
        nodes_to_quantize=nodes,
        nodes_to_exclude=exclude,
        range_methods={},
        tensor_overrides={},
        extra_options=dict(recipe.extra_options),
        notes=tuple(notes),
        per_channel=recipe.per_channel,
        activation_type=recipe.activation_type,
        weight_type=recipe.weight_type,
        branch_points=points,
        float_outputs=recipe.float_outputs,
    )


def _check_exclude(g: _Graph, exclude: Sequence[str]) -> None:
    known = [n.name for n in g.nodes if n.name]
    known_set = set(known)
    for name in exclude:
        if name not in known_set:
            raise BadInputError(f"quantize exclude: node '{name}' is not in the model{did_you_mean(name, known)}; "
                                "pass node names as they appear in the ONNX graph")


def _check_named(nodes: Sequence[onnx.NodeProto]) -> None:
    for node in nodes:
        if not node.name:
            raise BadInputError(f"ONNX node {node.op_type}({', '.join(node.input)}) has no name; onnxruntime selects "
                                "nodes to quantize by name: give every node a name (re-export with torch.onnx)")
