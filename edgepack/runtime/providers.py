"""Execution providers (EPs): one small class per ONNX Runtime EP, registered by name.

ONNX Runtime does the work; this module only says, honestly, whether an EP can run here and what to pass as
`InferenceSession(providers=...)`. An EP that is not in this onnxruntime build reports why and how to get it;
nothing is ever faked by silently running on the CPU instead (the probe also checks that the session really
got the EP it asked for).

>>> ep = get_provider("cpu")
>>> ep.availability() is None
True
>>> ep.session_providers()
['CPUExecutionProvider']
>>> [ep.name for ep in parse_providers("cpu, xnnpack")]
['cpu', 'xnnpack']
"""

from __future__ import annotations

import importlib.util
from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import onnxruntime as ort

from edgepack.errors import BadInputError
from edgepack.registry import Registry

#: How a figure was obtained: on the real device, on an emulator (QNN HTP on x86), or by static analysis.
HOW_VALUES = ("device", "emulated", "static-analysis")


@dataclass(frozen=True)
class ProviderInfo:
    name: str  # edgepack's name, e.g. "qnn-htp"
    ort_name: str  # ONNX Runtime's name, e.g. "QNNExecutionProvider"
    how: str  # "device" | "emulated" | "static-analysis"


class ExecutionProvider(ABC):
    """Base class: set the class attributes; override `availability` when the default check is not enough.

    The default says the EP is usable when every name in `required` is in `onnxruntime.get_available_providers()`.
    """

    name: ClassVar[str]
    ort_name: ClassVar[str]
    how: ClassVar[str]
    #: pip extra of edgepack that installs this EP (`pip install 'edgepack[gpu]'`), or None when there is none.
    extra: ClassVar[str | None] = None
    #: Why it is missing and how to get it, when no extra installs it.
    missing_hint: ClassVar[str] = ""

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

    def session_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        """What to pass as `InferenceSession(providers=...)`; ORT adds the CPU EP as fallback for unsupported nodes."""
        return [self.ort_name]

    def info(self) -> ProviderInfo:
        return ProviderInfo(name=self.name, ort_name=self.ort_name, how=self.how)


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


@_provider
class XNNPACKProvider(ExecutionProvider):
    name = "xnnpack"
    ort_name = "XnnpackExecutionProvider"
    how = "device"
    missing_hint = "XNNPACK is not in the Linux onnxruntime wheel; it ships in onnxruntime-android and onnxruntime-c"


@_provider
class NNAPIProvider(ExecutionProvider):
    name = "nnapi"
    ort_name = "NnapiExecutionProvider"
    how = "device"
    missing_hint = "NNAPI is Android-only; it ships in onnxruntime-android"


@_provider
class CoreMLProvider(ExecutionProvider):
    name = "coreml"
    ort_name = "CoreMLExecutionProvider"
    how = "device"
    missing_hint = "CoreML is Apple-only; it ships in the macOS onnxruntime wheel and onnxruntime-objc"


@_provider
class CUDAProvider(ExecutionProvider):
    name = "cuda"
    ort_name = "CUDAExecutionProvider"
    how = "device"
    extra = "gpu"


@_provider
class TensorRTProvider(ExecutionProvider):
    name = "tensorrt"
    ort_name = "TensorrtExecutionProvider"
    how = "device"
    extra = "gpu"

    @property
    def required(self) -> tuple[str, ...]:
        return (self.ort_name, "CUDAExecutionProvider")

    def session_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        # Nodes TensorRT rejects go to CUDA before they fall back to the CPU.
        return [self.ort_name, "CUDAExecutionProvider"]


@_provider
class QNNHTPProvider(ExecutionProvider):
    """Qualcomm QNN, HTP (NPU) backend. On an x86 host the HTP backend is a simulator, hence "emulated".

    Newer builds ship it as a plugin EP in the `onnxruntime_qnn` package, registered with
    `onnxruntime.register_execution_provider_library`; that registration is not implemented yet, so a plugin
    install reports itself unavailable rather than pretending. Older onnxruntime-qnn wheels build the EP in.
    """

    name = "qnn-htp"
    ort_name = "QNNExecutionProvider"
    how = "emulated"
    extra = "qnn"

    def availability(self) -> str | None:
        if self.ort_name in ort.get_available_providers():
            return None
        if importlib.util.find_spec("onnxruntime_qnn") is None:
            return f"onnxruntime_qnn is not installed; pip install 'edgepack[{self.extra}]'"
        return "onnxruntime_qnn is installed, but edgepack does not register its plugin EP library yet"

    def session_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        return [(self.ort_name, {"backend_type": "htp"})]


def get_provider(name: str) -> ExecutionProvider:
    """The provider registered as `name`; an unknown name is a BadInputError listing the known ones."""
    return PROVIDERS.get(name)()


def parse_providers(spec: str) -> list[ExecutionProvider]:
    """'cpu,qnn-htp' -> providers, in order. Empty items and repeats are errors, never dropped silently."""
    names = [item.strip() for item in spec.split(",")]
    if any(not name for name in names):
        raise BadInputError(f"--ep '{spec}': empty provider name; write names separated by commas, e.g. 'cpu,qnn-htp'")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BadInputError(f"--ep '{spec}': '{repeated[0]}' is given twice; list each provider once")
    return [get_provider(name) for name in names]
