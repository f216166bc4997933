"""ONNX Runtime's log level, for this process and every probe child: errors only, unless `--debug`.

Models exported by other tools make ONNX Runtime print hundreds of warnings (graph.cc "Removing initializer ...",
"ir_version" notes) that bury edgepack's own lines; they are not errors. `edgepack --debug` turns warnings back on.
The probe passes the level to its children in request.json (`ort_log_severity`), so remote children obey it too.
"""

from __future__ import annotations

import onnxruntime as ort

from edgepack.runtime.probe_child import DEFAULT_LOG_SEVERITY

#: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
WARNING, ERROR = 2, 3
_severity = DEFAULT_LOG_SEVERITY


def set_ort_logging(*, debug: bool) -> None:
    """Errors only (default) or warnings and up (`debug`), for every session created from now on."""
    global _severity
    _severity = WARNING if debug else ERROR
    ort.set_default_logger_severity(_severity)


def ort_log_severity() -> int:
    return _severity
