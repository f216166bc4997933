"""The typed report: report.json is built from these models, validated on write, its JSON Schema published.

The keys of the report.json contract in DESIGN.md keep their names and meaning (other tools read them):
`edgepack_version, recipe, reference, passed, variants.<v>.{path, size_bytes, sha256, providers.<ep>.{status, how,
latency_ms, memory_mb, metrics, coverage}}, gates`. Measurement blocks (`latency_ms`, `memory_mb`, `coverage`) declare
their contract keys and allow more (the probe adds spread, phases and breakdowns); everything else is closed, so a
misspelt key is an error when the report is written, not a silent gap in a dashboard.

`docs/report.schema.json` is `Report.model_json_schema()`; a test keeps the file equal to the model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 3  # 1: the untyped dicts of edgepack 0.1; 3: device block, device per row, generated data


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Latency(_Open):
    """Milliseconds over the timed runs of a fresh process (batch 1 unless `shape` says otherwise)."""

    p50: float
    p90: float
    p99: float
    runs: int


class Memory(_Open):
    """MiB of the measuring process: after imports, after session creation, after the first run, and its peak."""

    baseline: float
    after_session: float
    after_first_run: float
    peak: float


class Coverage(_Open):
    """Nodes the EP took (after ONNX Runtime's partitioning) out of all nodes, and how many partitions."""

    nodes_on_ep: int | None = None
    nodes_total: int | None = None
    partitions: int | None = None


class MemoryPoint(_Closed):
    """Peak RSS of a fresh process whose KV cache holds `context` tokens, and what the arithmetic predicted."""

    context: int
    peak_rss_mb: float
    predicted_mb: float | None = None
    cache_mb: float | None = None
    after_session_mb: float | None = None
    baseline_mb: float | None = None


class ContextFit(_Closed):
    budget_mb: float
    longest_context: int
    fits: bool


class MemoryPlan(_Closed):
    """Memory a decoder needs: weights + KV cache per token (config arithmetic) against measured peaks, and the
    longest context that fits each budget."""

    weight_bytes: int
    kv_dtype: str
    kv_bytes_per_token: int
    kv_formula: str
    fixed_mb: float
    measured_bytes_per_token: float | None = None
    kv_copies_predicted: int = 2
    points: list[MemoryPoint] = Field(default_factory=list)
    fits: list[ContextFit] = Field(default_factory=list)
    max_positions: int | None = None
    method: str = ""


class ProviderResult(_Closed):
    status: Literal["ok", "unavailable", "failed"]
    how: Literal["device", "emulated", "static-analysis"]
    #: where the row was measured: "local" or the device's URL (ssh://user@host:port, adb://serial); its facts
    #: are the report's `device` block
    device: str | None = None
    error: str | None = None
    latency_ms: Latency | None = None
    memory_mb: Memory | None = None
    #: fidelity vs `compared_to` (cosine_mean, cosine_min, sqnr_db, top1_agreement, ...) and task metrics
    metrics: dict[str, float | None] = Field(default_factory=dict)
    coverage: Coverage | None = None
    evaluation_samples: int | None = None
    #: why a fidelity figure is missing (e.g. output widths differ), when it is
    fidelity_note: str | None = None
    #: decoders (family causal-lm): memory you can plan with
    memory_plan: MemoryPlan | None = None
    #: a family task (e.g. a memory measurement) that failed: task -> error
    task_errors: dict[str, str] | None = None


class EvaluationSetResult(_Closed):
    """Task metrics of one variant on one named evaluation set (`data.evaluation_sets`), CPU EP outputs."""

    samples: int
    metrics: dict[str, float | None] = Field(default_factory=dict)
    provider: str = "cpu"


class Variant(_Closed):
    path: str
    size_bytes: int
    sha256: str
    #: the variant whose CPU outputs this one's fidelity is measured against (its parent in the pipeline)
    compared_to: str | None = None
    providers: dict[str, ProviderResult] = Field(default_factory=dict)
    #: name -> task metrics on each of the recipe's extra evaluation sets (e.g. out-of-domain retrieval)
    evaluation_sets: dict[str, EvaluationSetResult] = Field(default_factory=dict)


class Gate(_Closed):
    name: str
    variant: str
    provider: str
    threshold: float
    value: float | None
    passed: bool


class StageSummary(_Closed):
    """One stage folder of the run: reused from an earlier run, or written by this one."""

    stage: str
    folder: str
    reused: bool
    wall_time_s: float | None = None
    peak_rss_mb: float | None = None


class DataInfo(_Closed):
    path: str
    n_calibration: int
    n_evaluation: int
    hash: str | None = None
    #: without data: input name -> how it was generated ("int64 [1, 128]: token ids uniform in [0, 30522)")
    generated: dict[str, str] | None = None


class DeviceInfo(_Closed):
    """The machine the figures come from (`edgepack doctor` prints the same block); read on the device itself."""

    label: str  # "local", or ssh://user@host:port, adb://serial
    hostname: str
    os: str
    machine: str
    cpu: str
    #: int8 dot-product instructions: VNNI / AMX on x86, dot-product / i8mm on ARM, or "none (AVX2 multiply-add)"
    int8_isa: str
    cores: int | None = None
    usable_cores: int | None = None  # this process's CPU affinity
    cpu_quota: float | None = None  # CPUs the cgroup allows, if limited
    memory_total_mb: float | None = None
    memory_available_mb: float | None = None  # MemAvailable
    memory_limit_mb: float | None = None  # cgroup memory limit, if any
    python: str
    onnxruntime: str
    numpy: str
    ort_providers: list[str] = Field(default_factory=list)
    #: ONNX Runtime intra-op threads the measurements used
    threads: int | None = None
    #: edgepack EP -> "available" or why not (`edgepack doctor` also runs each available EP once)
    providers: dict[str, str] = Field(default_factory=dict)


class BundleInfo(_Closed):
    path: str
    variant: str


class QuantizationSummary(_Open):
    """What the report says about the INT8 stage: plan, SmoothQuant alphas, budget, fallback, sensitive layers."""

    stage: str


class AutoFigures(_Closed):
    """A candidate's figures, and how they were obtained: proxy (exact size, analytic memory bound; nothing run),
    rung (a fresh process on the first `samples` evaluation samples, a short latency), harness (the validate stage:
    every EP, the recipe's warm-up and runs)."""

    size_mb: float | None = None
    #: the task metric, and its drop in points (x100) below the FP32 reference on the same samples
    metric: float | None = None
    accuracy_drop: float | None = None
    #: MiB the model adds to a fresh process at its peak (VmHWM minus the RSS after importing the runtime)
    peak_rss_mb: float | None = None
    process_peak_rss_mb: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    #: fidelity: cosine of the primary output to the FP32 reference's on the same samples (mean, worst sample)
    cosine_mean: float | None = None
    cosine_min: float | None = None
    samples: int = 0
    how: Literal["proxy", "rung", "harness"] = "proxy"
    #: figures that are analytic estimates (lower bounds), not measurements
    estimated: list[str] = Field(default_factory=list)


class AutoCandidate(_Closed):
    trial: int
    #: knob -> value (`auto.space`)
    params: dict[str, Any]
    state: Literal["complete", "pruned", "failed", "running"]
    reason: str | None = None
    figures: AutoFigures
    #: what the search minimised: objective / the reference's, plus 10 + the budget violations when one is missed
    objective_value: float | None = None
    pareto: bool = False
    finalist: bool = False
    meets_budgets: bool | None = None
    #: the finalist's name in `variants`, and its model file relative to the run folder
    variant: str | None = None
    model: str | None = None
    #: host:pid of the processes that built and measured it
    workers: list[str] = Field(default_factory=list)


class AutoBudget(_Closed):
    name: str
    limit: float
    unit: str
    meaning: str


class AutoSummary(_Closed):
    """What `edgepack auto` searched, how it spent its measurements, the Pareto front and the choice."""

    objective: str
    metric: str | None = None
    #: the EP the budgets are read on (the harness asks every EP of the recipe too)
    ep: str
    backend: str
    space: dict[str, Any]
    budgets: list[AutoBudget]
    #: evaluation samples per successive-halving rung, and the reduction factor between rungs
    rung_samples: list[int]
    reduction_factor: int
    candidates: list[AutoCandidate]
    #: trial numbers on the Pareto front over (task metric, size, peak RSS, p50)
    pareto: list[int] = Field(default_factory=list)
    chosen: int | None = None
    chosen_variant: str | None = None
    verdict: str
    counts: dict[str, int] = Field(default_factory=dict)
    wall_time_s: float | None = None


class Report(_Closed):
    schema_version: int = SCHEMA_VERSION
    edgepack_version: str
    recipe: dict[str, Any]
    #: where the figures were measured (host, CPU, int8 ISA, memory, runtime versions)
    device: DeviceInfo | None = None
    #: the family's description of the model (family, task, source, family options; `signature`: the reference
    #: graph's inputs and outputs, which `edgepack compare` matches)
    model: dict[str, Any]
    data: DataInfo
    reference: str
    primary_output: str
    passed: bool
    variants: dict[str, Variant]
    gates: list[Gate] = Field(default_factory=list)
    stages: list[StageSummary] = Field(default_factory=list)
    validation_folder: str | None = None
    quantization: QuantizationSummary | None = None
    bundle: BundleInfo | None = None
    #: `edgepack auto`: the search, its Pareto front and the chosen candidate
    auto: AutoSummary | None = None
    #: notes a reader needs next to the figures (e.g. how a student of another width was compared)
    notes: list[str] = Field(default_factory=list)


def report_schema() -> dict[str, Any]:
    schema = Report.model_json_schema()
    schema["$id"] = "https://edgepack.invalid/report.schema.json"
    schema["title"] = "edgepack report.json"
    return schema
