"""Execution providers (EPs): one small class per ONNX Runtime EP, registered by name.

ONNX Runtime does the work; this module says, honestly, whether an EP can run here, how its numbers are
obtained (`how`: on this device, emulated, or by static analysis), how the model must be prepared for it
(fixed shapes for NPUs, fp16 for GPUs, ORT format for mobile) and what session the probe child must build
(`SessionPlan`, JSON-able). An EP that is not in this onnxruntime build reports why and which extra installs
it; nothing is ever faked by silently running on the CPU instead (the probe checks the session got the EP).

Some EPs take a profile after a slash: `mobile-cpu/t2-lean-ort` (CPU EP, 2 threads, memory-lean options,
ORT-format model), `qnn-htp/soc69` (the SoC the HTP emulator models), `cuda/fp16`. A bare family name with
default profiles (`mobile-cpu`) expands to one row per profile in `parse_providers`.

>>> ep = get_provider("cpu")
>>> ep.availability() is None, ep.key, ep.session_plan(cache_dir=Path("cache")).providers
(True, 'cpu', ('CPUExecutionProvider',))
>>> [ep.key for ep in parse_providers("cpu, mobile-cpu")]
['cpu', 'mobile-cpu/t1', 'mobile-cpu/t2', 'mobile-cpu/t4', 'mobile-cpu/t2-lean', 'mobile-cpu/t2-ort']
"""

from __future__ import annotations

import importlib.util
import platform
import re
import tempfile
from abc import ABC
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnxruntime as ort

from edgepack.errors import BadInputError, EdgepackError
from edgepack.registry import Registry
from edgepack.runtime.probe_child import _REGISTERED_PLUGINS, apply_plan_json

#: How a figure was obtained: on the real device, on an emulator (QNN HTP on x86), or by static analysis.
HOW_VALUES = ("device", "emulated", "static-analysis")

#: Hosts whose QNN HTP backend drives a real Hexagon NPU (Snapdragon Linux / Windows on ARM); elsewhere it emulates.
_ARM_HOST = platform.machine().lower() in ("aarch64", "arm64")


@dataclass(frozen=True)
class ProviderInfo:
    name: str  # edgepack's row key, e.g. "qnn-htp" or "mobile-cpu/t2-lean"
    ort_name: str  # ONNX Runtime's name, e.g. "QNNExecutionProvider"
    how: str  # "device" | "emulated" | "static-analysis"


@dataclass(frozen=True)
class PluginLibrary:
    """An EP shipped as its own shared library (ORT >= 1.23 plugin EPs), e.g. the `onnxruntime_qnn` package."""

    registration_name: str  # name given to onnxruntime.register_execution_provider_library
    library_path: str
    ep_name: str  # OrtEpDevice.ep_name of the devices to select


@dataclass(frozen=True)
class ModelPrep:
    """How the model file must be rewritten before this EP sees it (done in the parent, in the probe's folder)."""

    fixed_shapes: bool = False  # NPUs: batch 1, sequence = the latency feed's; evaluation feeds get padded
    fp16: bool = False  # GPUs: onnxruntime.transformers.float16, float32 inputs and outputs kept
    ort_format: bool = False  # mobile: onnxruntime.tools' ORT-format converter


@dataclass(frozen=True)
class SessionPlan:
    """Everything the probe child needs to build the session; `to_json` goes into request.json."""

    expect_ep: str  # must appear in session.get_providers(), and is the EP whose coverage is counted
    providers: tuple[Any, ...] = ()  # InferenceSession(providers=...) for EPs built into onnxruntime
    plugin: PluginLibrary | None = None
    plugin_options: dict[str, str] = field(default_factory=dict)
    #: environment the plugin reads when it is registered (set in the child before registration)
    plugin_env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None  # None: the probe's intra_op_threads; a mobile-cpu profile pins its own
    #: enable_cpu_mem_arena=False, enable_mem_pattern=False, session.disable_prepacking=1
    lean_memory: bool = False
    io_binding_device: str | None = None  # "cuda": inputs and outputs stay on the GPU while timing
    #: A second, profiled session after the measurement reads ORT's CPU allocator figures (CPU EP only).
    profile_memory: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionPlan:
        """Inverse of `to_json` (JSON turned the ("EP", {...}) pairs into lists; ORT wants tuples)."""
        plugin = PluginLibrary(**data["plugin"]) if data.get("plugin") else None
        providers = tuple(tuple(p) if isinstance(p, list) else p for p in data.get("providers", ()))
        return cls(**{**data, "plugin": plugin, "providers": providers})


def apply_plan(plan: SessionPlan, options: ort.SessionOptions) -> list[Any] | None:
    """Put the plan's EP into `options`; returns what to pass as `InferenceSession(providers=...)`.

    A plugin EP is registered (once per process: ORT refuses a second registration) and added with
    `add_provider_for_devices`; it must not also be named in `providers=`, so None comes back. Naming a plugin
    EP in `providers=` without this would not fail: ORT would silently run everything on the CPU. The probe child
    does the same from the plan's JSON (`probe_child.apply_plan_json`, the one implementation).
    """
    return apply_plan_json(plan.to_json(), options)


class ExecutionProvider(ABC):
    """Base class: set the class attributes; override `availability`, `session_plan` or `model_prep` as needed.

    The default says the EP is usable when every name in `required` is in `onnxruntime.get_available_providers()`.
    Profiles: set `profile_pattern` (a regex the text after the slash must match) and, for a family that
    expands, `default_profiles`.
    """

    name: ClassVar[str]
    ort_name: ClassVar[str]
    #: the class's default; a profile may change it per instance (webgpu/software is emulated)
    how: str
    #: pip extra of edgepack that installs this EP (`pip install 'edgepack[gpu]'`), or None when there is none.
    extra: ClassVar[str | None] = None
    #: Why it is missing and how to get it, when no extra installs it.
    missing_hint: ClassVar[str] = ""
    profile_pattern: ClassVar[str | None] = None
    profile_help: ClassVar[str] = ""
    default_profiles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, profile: str = "") -> None:
        if profile and (self.profile_pattern is None or not re.fullmatch(self.profile_pattern, profile)):
            allowed = self.profile_help or "it takes no profile"
            raise BadInputError(f"execution provider '{self.name}/{profile}': unknown profile; {allowed}")
        self.profile = profile

    @property
    def key(self) -> str:
        """The row name in report.json's providers dict."""
        return f"{self.name}/{self.profile}" if self.profile else self.name

    def expand(self) -> list[ExecutionProvider]:
        """One provider per default profile for a bare family name (`mobile-cpu`), else [self]."""
        if self.profile or not self.default_profiles:
            return [self]
        return [type(self)(profile) for profile in self.default_profiles]

    @property
    def required(self) -> tuple[str, ...]:
        return (self.ort_name,)

    def availability(self) -> str | None:
        """None when usable here, else a one-line reason that names the fix."""
        missing = [name for name in self.required if name not in ort.get_available_providers()]
        if not missing:
            return None
        hint = f"pip install 'edgepack[{self.extra}]'" if self.extra else self.missing_hint
        verb = "is" if len(missing) == 1 else "are"
        return f"{' and '.join(missing)} {verb} not in this onnxruntime build ({ort.__version__}); {hint}"

    @property
    def static_only(self) -> bool:
        """True when this runtime cannot run the EP and coverage comes from static analysis instead."""
        return self.how == "static-analysis"

    def model_prep(self) -> ModelPrep:
        return ModelPrep()

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        """The session the probe child builds; ORT adds the CPU EP as fallback for nodes this EP rejects."""
        return SessionPlan(expect_ep=self.ort_name, providers=(self.ort_name,))

    def configure_session(self, options: ort.SessionOptions, *, cache_dir: Path) -> list[Any] | None:
        """For callers that build their own session: `InferenceSession(path, options, providers=<this>)`."""
        return apply_plan(self.session_plan(cache_dir=cache_dir), options)

    def session_providers(self) -> list[Any]:
        """`InferenceSession(providers=...)` for an EP built into onnxruntime.

        A plugin EP (qnn-htp from onnxruntime_qnn) cannot be named there (ORT would silently use the CPU):
        that is an EdgepackError pointing at `configure_session`.
        """
        plan = self.session_plan(cache_dir=Path(tempfile.gettempdir()) / "edgepack-ep-cache")
        if plan.plugin is not None:
            raise EdgepackError(f"{self.key} is a plugin EP ({plan.plugin.library_path}); build the session with "
                                "ExecutionProvider.configure_session(options, cache_dir=...) instead")
        return list(plan.providers)

    def info(self) -> ProviderInfo:
        return ProviderInfo(name=self.key, ort_name=self.ort_name, how=self.how)


PROVIDERS: Registry[type[ExecutionProvider]] = Registry("execution provider")


def _provider(cls: type[ExecutionProvider]) -> type[ExecutionProvider]:
    """Register a provider class under its own `name`, so the two can never disagree."""
    if cls.how not in HOW_VALUES:
        raise ValueError(f"execution provider '{cls.name}': how must be one of {HOW_VALUES}, not '{cls.how}'")
    return PROVIDERS.register(cls.name)(cls)


@_provider
class CPUProvider(ExecutionProvider):
    name = "cpu"
    ort_name = "CPUExecutionProvider"
    how = "device"

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        return SessionPlan(expect_ep=self.ort_name, providers=(self.ort_name,), profile_memory=True)


@_provider
class MobileCPUProvider(ExecutionProvider):
    """The CPU EP set up as an app would on a phone: a few threads, memory-lean options, an ORT-format model.

    Measured on this host's CPU (how = "device" means this machine, not a phone); the rows show the trade-off
    of each setting against the others on the same model.
    """

    name = "mobile-cpu"
    ort_name = "CPUExecutionProvider"
    how = "device"
    profile_pattern = r"t([1-9][0-9]?)(-lean)?(-ort)?"
    profile_help = "write t<threads>[-lean][-ort], e.g. mobile-cpu/t2-lean-ort"
    default_profiles = ("t1", "t2", "t4", "t2-lean", "t2-ort")

    def _parts(self) -> tuple[int, bool, bool]:
        match = re.fullmatch(self.profile_pattern or "", self.profile or "t2")
        if match is None:  # unreachable: __init__ checked the profile
            raise BadInputError(f"mobile-cpu profile '{self.profile}': {self.profile_help}")
        return int(match.group(1)), bool(match.group(2)), bool(match.group(3))

    def model_prep(self) -> ModelPrep:
        return ModelPrep(ort_format=self._parts()[2])

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        threads, lean, _ = self._parts()
        return SessionPlan(expect_ep=self.ort_name, providers=(self.ort_name,), threads=threads, lean_memory=lean,
                           profile_memory=True)


@_provider
class XNNPACKProvider(ExecutionProvider):
    name = "xnnpack"
    ort_name = "XnnpackExecutionProvider"
    how = "device"
    missing_hint = "XNNPACK is not in the Linux onnxruntime wheel; it ships in onnxruntime-android and onnxruntime-c"


class _StaticWhereMissing(ExecutionProvider):
    """Run for real where the runtime has the EP; elsewhere, static partition analysis (coverage only)."""

    def availability(self) -> str | None:
        return None  # static analysis needs only onnx and onnxruntime's tools

    def model_prep(self) -> ModelPrep:
        return ModelPrep(fixed_shapes=True)


@_provider
class NNAPIProvider(_StaticWhereMissing):
    name = "nnapi"
    ort_name = "NnapiExecutionProvider"
    how = "device" if ort_name in ort.get_available_providers() else "static-analysis"
    missing_hint = "NNAPI is Android-only; it ships in onnxruntime-android"


@_provider
class CoreMLProvider(_StaticWhereMissing):
    name = "coreml"
    ort_name = "CoreMLExecutionProvider"
    how = "device" if ort_name in ort.get_available_providers() else "static-analysis"
    missing_hint = "CoreML is Apple-only; it ships in the macOS onnxruntime wheel and onnxruntime-objc"

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        return SessionPlan(expect_ep=self.ort_name, providers=((self.ort_name, {"ModelFormat": "MLProgram"}),))


class _GPUProvider(ExecutionProvider):
    extra = "gpu"
    profile_pattern = "fp16"
    profile_help = "write cuda/fp16 or tensorrt/fp16 (the model converted to float16, float32 inputs and outputs)"

    def model_prep(self) -> ModelPrep:
        return ModelPrep(fp16=self.profile == "fp16")


@_provider
class CUDAProvider(_GPUProvider):
    name = "cuda"
    ort_name = "CUDAExecutionProvider"
    how = "device"

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        return SessionPlan(expect_ep=self.ort_name, providers=((self.ort_name, {"device_id": "0"}),),
                           io_binding_device="cuda")


@_provider
class TensorRTProvider(_GPUProvider):
    name = "tensorrt"
    ort_name = "TensorrtExecutionProvider"
    how = "device"

    @property
    def required(self) -> tuple[str, ...]:
        return (self.ort_name, "CUDAExecutionProvider")

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        # Building a TensorRT engine takes minutes; the cache folder makes the second run of a model load in seconds.
        options = {"device_id": "0", "trt_engine_cache_enable": "True",
                   "trt_engine_cache_path": str(cache_dir / "tensorrt-engines"),
                   "trt_fp16_enable": "True" if self.profile == "fp16" else "False"}
        # Nodes TensorRT rejects go to CUDA before they fall back to the CPU.
        return SessionPlan(expect_ep=self.ort_name, providers=((self.ort_name, options), "CUDAExecutionProvider"),
                           io_binding_device="cuda")


@_provider
class QNNHTPProvider(ExecutionProvider):
    """Qualcomm QNN, HTP (Hexagon NPU) backend, from the `onnxruntime_qnn` plugin package (`edgepack[qnn]`).

    The plugin is registered with `onnxruntime.register_execution_provider_library` and selected with
    `SessionOptions.add_provider_for_devices`, as the package's docs describe; older wheels that build QNN into
    onnxruntime are used directly. On an x86 host the HTP backend is a simulator: numerics and node
    assignment are real, timings are NOT device timings, hence how = "emulated". The simulator needs the SoC
    it models (`soc_model`; without it graph finalization fails with QNN_COMMON_ERROR_MEM_ALLOC): default 57,
    Snapdragon 8 Gen 3 (SM8650, HTP v75); `qnn-htp/soc69` picks another.
    """

    name = "qnn-htp"
    ort_name = "QNNExecutionProvider"
    how = "device" if _ARM_HOST else "emulated"
    extra = "qnn"
    profile_pattern = r"soc[0-9]{1,3}"
    profile_help = "write qnn-htp/soc<QNN soc_model id>, e.g. qnn-htp/soc69 (Snapdragon 8 Elite)"
    default_soc_model = "57"

    def availability(self) -> str | None:
        if self.ort_name in ort.get_available_providers():
            return None
        if importlib.util.find_spec("onnxruntime_qnn") is None:
            return f"onnxruntime_qnn is not installed; pip install 'edgepack[{self.extra}]'"
        if not hasattr(ort, "register_execution_provider_library"):
            return (f"onnxruntime {ort.__version__} cannot load plugin EPs such as onnxruntime_qnn; "
                    "pip install -U 'onnxruntime>=1.23'")
        missing = [path for path in _qnn_paths() if not Path(path).is_file()]
        if missing:
            return f"onnxruntime_qnn ships no {Path(missing[0]).name} for this platform ({platform.machine()})"
        return None

    def model_prep(self) -> ModelPrep:
        return ModelPrep(fixed_shapes=True)

    def _backend_options(self, backend_path: str) -> dict[str, str]:
        options = {"backend_path": backend_path}
        soc = self.profile.removeprefix("soc") if self.profile else (None if _ARM_HOST else self.default_soc_model)
        if soc is not None:  # on a real device QNN reads the SoC itself unless told otherwise
            options["soc_model"] = soc
        return options

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        # QNN built into this onnxruntime (not merely registered as a plugin earlier in this process: a probe
        # child starts without that registration, so it must get the plugin plan)
        if self.ort_name in ort.get_available_providers() and self.ort_name not in _REGISTERED_PLUGINS:
            options = self._backend_options("libQnnHtp.so")
            return SessionPlan(expect_ep=self.ort_name, providers=((self.ort_name, options),))
        library, htp = _qnn_paths()
        plugin = PluginLibrary(registration_name=self.ort_name, library_path=library, ep_name=self.ort_name)
        return SessionPlan(expect_ep=self.ort_name, plugin=plugin, plugin_options=self._backend_options(htp))


@_provider
class WebGPUProvider(ExecutionProvider):
    """WebGPU (Dawn over Vulkan, Metal or D3D12), a plugin EP from the `onnxruntime-ep-webgpu` package
    (`edgepack[webgpu]`, ONNX Runtime >= 1.24.4), registered like qnn-htp and run node by node on the GPU.

    Profiles: `webgpu` (the model as it is, fp32), `webgpu/fp16` (converted to float16, float32 inputs and outputs
    kept, as for CUDA); `-software` (`webgpu/software`, `webgpu/fp16-software`) also lets Dawn take a software
    Vulkan adapter (Mesa's lavapipe: ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1 in the probe child), which runs the
    same GPU code path on the CPU: numerics and node assignment are real, timings are not a GPU's (how = emulated).
    Without a GPU or an adapter Dawn accepts, session creation fails with "Failed to get a WebGPU adapter: No
    supported adapters": that row is "failed" with the message (Mesa 22.3's lavapipe is refused: it lacks
    shaderUniform*ArrayDynamicIndexing; Mesa 25.0 from bookworm-backports is accepted).
    """

    name = "webgpu"
    ort_name = "WebGpuExecutionProvider"
    how = "device"
    extra = "webgpu"
    profile_pattern = r"fp16|software|fp16-software"
    profile_help = "write webgpu, webgpu/fp16, webgpu/software or webgpu/fp16-software"
    minimum_ort = (1, 24, 4)
    software_env = {"ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1"}

    def __init__(self, profile: str = "") -> None:
        super().__init__(profile)
        self.fp16 = self.profile.startswith("fp16")
        self.software = self.profile.endswith("software")
        self.how = "emulated" if self.software else "device"

    def availability(self) -> str | None:
        if importlib.util.find_spec("onnxruntime_ep_webgpu") is None:
            return f"onnxruntime-ep-webgpu is not installed; pip install 'edgepack[{self.extra}]'"
        version = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:3])
        if version < self.minimum_ort or not hasattr(ort, "register_execution_provider_library"):
            return (f"onnxruntime {ort.__version__} cannot load the WebGPU plugin EP; pip install -U "
                    f"'onnxruntime>={'.'.join(map(str, self.minimum_ort))}'")
        library, _ = _webgpu_library()
        if not Path(library).is_file():
            return f"onnxruntime-ep-webgpu ships no {Path(library).name} for this platform ({platform.machine()})"
        return None

    def model_prep(self) -> ModelPrep:
        return ModelPrep(fp16=self.fp16)

    def session_plan(self, *, cache_dir: Path) -> SessionPlan:
        library, ep_name = _webgpu_library()
        plugin = PluginLibrary(registration_name="webgpu", library_path=library, ep_name=ep_name)
        return SessionPlan(expect_ep=ep_name, plugin=plugin,
                           plugin_env=dict(self.software_env) if self.software else {})


def _webgpu_library() -> tuple[str, str]:
    """(plugin EP library, its EP name) from the onnxruntime_ep_webgpu package (its __init__ loads no native code)."""
    import onnxruntime_ep_webgpu

    return str(onnxruntime_ep_webgpu.get_library_path()), onnxruntime_ep_webgpu.get_ep_name()


def _qnn_paths() -> tuple[str, str]:
    """(plugin EP library, HTP backend library) shipped in the onnxruntime_qnn package."""
    import onnxruntime_qnn  # its __init__ only computes paths: no native code is loaded here

    return onnxruntime_qnn.get_library_path(), onnxruntime_qnn.get_qnn_htp_path()


def get_provider(name: str) -> ExecutionProvider:
    """The provider for `name` or `name/profile`; an unknown name is a BadInputError listing the known ones."""
    family, _, profile = name.partition("/")
    return PROVIDERS.get(family)(profile)


def parse_providers(spec: str) -> list[ExecutionProvider]:
    """'cpu,qnn-htp,mobile-cpu' -> providers, in order, families expanded. Empty items and repeats are errors."""
    names = [item.strip() for item in spec.split(",")]
    if any(not name for name in names):
        raise BadInputError(f"--ep '{spec}': empty provider name; write names separated by commas, e.g. 'cpu,qnn-htp'")
    providers = [expanded for name in names for expanded in get_provider(name).expand()]
    keys = [provider.key for provider in providers]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise BadInputError(f"--ep '{spec}': '{repeated[0]}' is given twice; list each provider once")
    return providers
