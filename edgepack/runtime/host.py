"""What the machine a figure came from is: CPU model, its int8 dot-product instructions, cores, memory limit.

Read from /proc/cpuinfo (Linux, x86 and ARM) and cgroups; the probe carries the same facts from a remote device.
An INT8 speed-up depends on these instructions (VNNI / AMX on x86, dot-product / i8mm on ARM), so every benchmark
names them.

>>> describe_int8_isa({"avx2", "avx512_vnni", "amx_int8"})
'AVX-512 VNNI, AMX-INT8'
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: cpuinfo flag -> the name people use, most capable first; none of them: INT8 GEMMs use AVX2 / NEON multiply-adds
INT8_ISA_FLAGS = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                  ("i8mm", "ARM i8mm"), ("asimddp", "ARM dot-product"))


def cpu_flags() -> set[str]:
    text = _cpuinfo()
    match = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    match = re.search(r"^(?:model name|Hardware|Processor)\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return match.group(1).strip() if match else "unknown CPU"


def describe_int8_isa(flags: set[str]) -> str:
    """The int8 dot-product extensions among `flags` (VNNI before AMX in the text when both: most used first)."""
    found = [name for flag, name in INT8_ISA_FLAGS if flag in flags]
    order = ["AVX-512 VNNI", "AVX-VNNI", "AMX-INT8", "ARM i8mm", "ARM dot-product"]
    found.sort(key=order.index)
    if "AVX-512 VNNI" in found and "AVX-VNNI" in found:
        found.remove("AVX-VNNI")  # the 256-bit encoding of the same instruction
    if found:
        return ", ".join(found)
    return "none (AVX2 multiply-add)" if "avx2" in flags else "none"


def host_line() -> str:
    """'Intel Xeon ..., 2 cores, int8: AVX-512 VNNI, AMX-INT8': what a benchmark header names."""
    return f"{cpu_model()}, {os.cpu_count()} cores, int8 ISA: {describe_int8_isa(cpu_flags())}"


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    try:
        return path.read_text()
    except OSError:
        return ""
