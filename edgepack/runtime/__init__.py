"""Run ONNX models on execution providers and measure them: EP registry, subprocess probe, fidelity metrics.

Names are imported lazily (PEP 562): `python -m edgepack.runtime.probe` runs this package's __init__ first,
and an eager `from edgepack.runtime.probe import ...` here would load probe twice (runpy warns) and add
imports to the fresh process whose memory we measure.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgepack.runtime.metrics import cosine_rows, fidelity
    from edgepack.runtime.probe import ProbeOptions, ProbeResult, measure
    from edgepack.runtime.providers import (
        PROVIDERS,
        ExecutionProvider,
        ProviderInfo,
        get_provider,
        parse_providers,
    )

_WHERE = {
    "cosine_rows": "metrics", "fidelity": "metrics",
    "ProbeOptions": "probe", "ProbeResult": "probe", "measure": "probe",
    "PROVIDERS": "providers", "ExecutionProvider": "providers", "ProviderInfo": "providers",
    "get_provider": "providers", "parse_providers": "providers",
}
__all__ = [
    "PROVIDERS",
    "ExecutionProvider",
    "ProbeOptions",
    "ProbeResult",
    "ProviderInfo",
    "cosine_rows",
    "fidelity",
    "get_provider",
    "measure",
    "parse_providers",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'edgepack.runtime' has no attribute '{name}'")
    return getattr(import_module(f"edgepack.runtime.{_WHERE[name]}"), name)
